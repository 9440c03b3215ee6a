"""The transformers runtime: one HF model resident in this process, merged into in place."""

from __future__ import annotations

import logging

import torch

from hotmerge.config.evolve import ValidatedConfig
from hotmerge.errors import ConfigError, SetupError
from hotmerge.kernels import stats_cache
from hotmerge.models.vocab import fit_vocabulary
from hotmerge.runtimes.merger import Merger


def pick_device(device: str | None) -> str:
    """The device to run on: the one asked for, after checking that it is there; else cuda if present."""
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {device} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: this machine has no CUDA device: use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s): "
                              f"use cuda:0 to cuda:{count - 1}")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ConfigError(f"--device {device} is not available here: use --device cpu")
    return device


class HFRuntime:
    """load once; apply(recipe) writes the candidate into the live weights; `lm` scores."""

    def __init__(self, validated: ValidatedConfig, *, device: str | None = None,
                 batch_size: int | None = None, seed: int = 0, sources: str = "auto"):
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = pick_device(device)
        reference = validated.reference.path
        dtype = getattr(torch, validated.config.compute_dtype)
        try:
            # Never code from the model folder, never a pickle checkpoint (models/folder.py).
            self.model = AutoModelForCausalLM.from_pretrained(reference, dtype=dtype, trust_remote_code=False,
                                                              use_safetensors=True)
            fit_vocabulary(self.model, validated)
            self.model.to(self.device).eval()
        except torch.OutOfMemoryError:
            raise SetupError(f"{reference} does not fit in the memory of {self.device}: use a bigger "
                             "device, or --device cpu") from None
        except (OSError, ValueError) as error:
            message = " ".join(str(error).split())[:300]
            raise SetupError(f"transformers could not load {reference} ({type(error).__name__}: {message}): "
                             "check that this transformers supports the model, or try the vLLM runtime (--vllm); "
                             "HOTMERGE_DEBUG=1 shows the traceback") from error
        self.tokenizer = AutoTokenizer.from_pretrained(validated.tokenizer_path, trust_remote_code=False)
        # named_parameters() lists a tied lm_head once, under the embedding's name.
        self.live = {name: p for name, p in self.model.named_parameters()}
        # Merges are written in bf16; a float32 model gets a copy of those same values.
        self.merged = self.live if dtype == torch.bfloat16 else {
            name: torch.empty_like(p, dtype=torch.bfloat16) for name, p in self.live.items()}
        self.merger = Merger(validated, self.merged, seed=seed, stats_cache=stats_cache.folder(), sources=sources)
        self.sources = self.merger.sources
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        self.forward_batch = batch_size or 64  # documents per forward batch (racing rounds align to it)
        self.lm = HFLM(pretrained=self.model, tokenizer=self.tokenizer,
                       batch_size=self.forward_batch, device=self.device)

    @torch.no_grad()
    def apply(self, recipe) -> None:
        self.merger.apply(recipe)
        if self.merged is not self.live:
            for name, param in self.live.items():
                param.data.copy_(self.merged[name])

    def close(self) -> None:
        """Drop the model and the resident sources (a closed runtime cannot score)."""
        self.merger = self.lm = self.model = self.live = self.merged = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
