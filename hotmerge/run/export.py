"""Write a merged model folder with the same engine the search uses.

Inputs: a genome config plus a genotype (decoded by the genome), or a mergekit merge
config, read with every parameter mergekit takes (mergeconfig.py). Both become a
recipe that answers the merge parameters of every source tensor, and take one path.

A causal language model is built with transformers and saved with save_pretrained.
Any other architecture transformers knows (vision-language models such as Llava) is
merged tensor by tensor as mergekit merges it: every tensor of the reference's
checkpoint, under its own name (vision tower and projector included), written as
safetensors shards beside the reference's config, tokenizer and processor files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from hotmerge.config.evolve import ValidatedConfig
from hotmerge.errors import ConfigError

OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHARD_SIZE = "5GB"  # mergekit's default out_shard_size
# what a model folder holds besides its weights and config.json: tokenizer, processor,
# chat template and generation settings
SIDE_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
              "*.tiktoken", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
              "chat_template.json", "chat_template.jinja", "generation_config.json")


def export_merge(validated: ValidatedConfig, recipe, out_dir: str | Path, seed: int = 0) -> Path:
    """Merge a recipe (or a genotype of the validated genome) into the reference layout and
    save an HF model folder, atomically: a failed export leaves nothing at out_dir."""
    if isinstance(recipe, (np.ndarray, list)):
        recipe = validated.genome().decode(np.asarray(recipe, dtype=np.float64))
    out_dir = Path(out_dir)
    dtype = OUT_DTYPES[getattr(recipe, "dtype", "bfloat16")]  # a merge config may ask for float16
    out_dtype = getattr(recipe, "out_dtype", None)
    write = _causal_lm if validated.reference.causal_lm else _tensor_by_tensor
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(validated, recipe, tmp, seed, dtype, OUT_DTYPES[out_dtype] if out_dtype is not None else None)
        _set_chat_template(validated, getattr(recipe, "chat_template", None), tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _causal_lm(validated: ValidatedConfig, recipe, folder: Path, seed: int, dtype, out_dtype) -> None:
    """The merged model built by transformers from the reference, saved with save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hotmerge.models.vocab import fit_vocabulary
    from hotmerge.runtimes.merger import Merger

    # Never code from the model folder, never a pickle checkpoint (models/folder.py).
    model = AutoModelForCausalLM.from_pretrained(validated.reference.path, dtype=dtype, trust_remote_code=False,
                                                 use_safetensors=True)
    fit_vocabulary(model, validated)
    merger = Merger(validated, dict(model.named_parameters()), seed=seed, dtype=dtype)
    merger.apply(recipe)
    del merger
    if out_dtype is not None:
        model = model.to(out_dtype)  # mergekit casts the merged tensors on save
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer_source = validated.tokenizer_path
    if any(Path(tokenizer_source).glob("tokenizer*")):
        AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False).save_pretrained(folder)


def _set_chat_template(validated: ValidatedConfig, template, folder: Path) -> None:
    """A merge config's chat_template, as mergekit writes it: the tokenizer of the merge
    (its tokenizer source) saved with that template."""
    if not template:
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(validated.tokenizer_path, trust_remote_code=False)
    except (OSError, ValueError):
        raise ConfigError(f"chat_template is set but {validated.tokenizer_path} has no tokenizer to carry it: "
                          "add the tokenizer's files to that folder, or remove chat_template") from None
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)


def _tensor_by_tensor(validated: ValidatedConfig, recipe, folder: Path, seed: int, dtype, out_dtype) -> None:
    """Every tensor of the reference's checkpoint merged under its own name (no model is
    built), with the reference's config, tokenizer and processor files."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from hotmerge.runtimes.merger import Merger

    reference = validated.reference
    if validated.vocabulary is not None:
        raise ConfigError(f"tokenizer_source with a {reference.model_type} model is not supported: its vocabulary "
                          "is merged where the language model's embeddings are, which hotmerge does only for "
                          "causal language models; remove tokenizer_source (the models must share a vocabulary)")
    live = {name: torch.empty(info.shape, dtype=dtype) for name, info in reference.tensors.items()}
    merger = Merger(validated, live, seed=seed, dtype=dtype)
    merger.apply(recipe)
    del merger
    state = {name: t.to(out_dtype) if out_dtype is not None else t for name, t in live.items()}
    folder.mkdir(parents=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=SHARD_SIZE)
    for file, names in split.filename_to_tensors.items():
        save_file({name: state[name].contiguous() for name in names}, str(folder / file), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = dict(reference.config)
    name = str(out_dtype or dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for source in dict.fromkeys([validated.tokenizer_path, reference.path]):  # tokenizer first
        for pattern in SIDE_FILES:
            for path in Path(source).glob(pattern):
                if path.is_file() and not (folder / path.name).exists():
                    shutil.copyfile(path, folder / path.name)
