"""Write a merged model folder with the same engine the search uses.

Inputs: a genome config plus a genotype (decoded by the genome), or a mergekit merge
config, read with every parameter mergekit takes (mergeconfig.py). Both become a
recipe that answers the merge parameters of every source tensor, and take one path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from hotmerge.config.evolve import ValidatedConfig

OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_merge(validated: ValidatedConfig, recipe, out_dir: str | Path, seed: int = 0) -> Path:
    """Merge a recipe (or a genotype of the validated genome) into the reference layout and
    save an HF model folder, atomically: a failed export leaves nothing at out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hotmerge.models.vocab import fit_vocabulary
    from hotmerge.runtimes.merger import Merger

    if isinstance(recipe, (np.ndarray, list)):
        recipe = validated.genome().decode(np.asarray(recipe, dtype=np.float64))
    out_dir = Path(out_dir)
    reference = validated.reference.path
    dtype = OUT_DTYPES[getattr(recipe, "dtype", "bfloat16")]  # a merge config may ask for float16
    # Never code from the model folder, never a pickle checkpoint (models/folder.py).
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    fit_vocabulary(model, validated)
    merger = Merger(validated, dict(model.named_parameters()), seed=seed, dtype=dtype)
    merger.apply(recipe)
    del merger
    out_dtype = getattr(recipe, "out_dtype", None)
    if out_dtype is not None:
        model = model.to(OUT_DTYPES[out_dtype])  # mergekit casts the merged tensors on save
    tokenizer_source = validated.tokenizer_path
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if any(Path(tokenizer_source).glob("tokenizer*")):
            AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False).save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
