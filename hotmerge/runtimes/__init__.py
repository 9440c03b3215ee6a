"""Live models that candidates are written into, behind one contract.

    hf.py           transformers: the model in this process (the light path)
    vllm.py         vLLM: an engine kept resident, merged into through its worker
    vllm_worker.py  the code that runs inside vLLM's worker process
    vllm_compat.py  every vLLM internal the two reach, checked against the supported versions

Every runtime keeps one model resident and offers:
    apply(recipe)   write one candidate into the live weights (a recipe from the genome
                    or a merge config; nothing is written when it raises)
    lm              an lm-eval LM that scores the live weights
    close()         free the engine and its memory
"""

from __future__ import annotations

from typing import Protocol

from hotmerge.errors import ConfigError


class Runtime(Protocol):
    lm: object
    forward_batch: int  # documents scored in one forward batch (1: the engine batches by itself)
    sources: object  # models.plan.SourcesChoice: where the sources live, and why

    def apply(self, recipe) -> None: ...

    def close(self) -> None: ...


def check_runtime_options(backend: str, device: str | None, tensor_parallel_size: int) -> None:
    """Refuse options the chosen runtime or this machine cannot honour, before anything
    starts: an option is never dropped in silence."""
    tp = int(tensor_parallel_size)
    if backend == "hf" and tp > 1:
        raise ConfigError(f"--tensor-parallel-size {tp} splits a vLLM engine over GPUs, and the transformers "
                          "runtime runs on one device: add --vllm, or drop --tensor-parallel-size")
    if backend == "vllm" and device is not None:
        raise ConfigError(f"--device {device} is for the transformers runtime; the vLLM engine runs on the GPUs "
                          "that CUDA_VISIBLE_DEVICES shows (or the CPU): drop --device, or drop --vllm")
    if backend == "vllm" and tp > 1:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if tp > gpus:
            raise ConfigError(f"--tensor-parallel-size {tp} needs {tp} GPUs but this machine has {gpus}: "
                              f"use a --tensor-parallel-size of at most {max(gpus, 1)}")


def start_runtime(validated, *, backend: str, device: str | None = None, batch_size: int | None = None,
                  seed: int = 0, tensor_parallel_size: int = 1, sources: str = "auto") -> Runtime:
    """The runtime the backend names, started (model loaded, sources resident).
    sources: device, pinned or auto (models/plan.py choose_sources)."""
    from hotmerge.models.plan import SOURCES

    if sources not in SOURCES:
        raise ConfigError(f"--sources {sources}: use one of {', '.join(SOURCES)}")
    check_runtime_options(backend, device, tensor_parallel_size)
    if backend == "vllm":
        if validated.config.compute_dtype != "bfloat16":
            raise ConfigError(f"compute_dtype {validated.config.compute_dtype} is for the transformers runtime: "
                              "the vLLM engine computes in bfloat16; remove compute_dtype or drop --vllm")
        from hotmerge.runtimes.vllm import VLLMRuntime

        return VLLMRuntime(validated, seed=seed, batch_size=batch_size, tensor_parallel_size=tensor_parallel_size,
                           sources=sources)
    if backend == "hf":
        from hotmerge.runtimes.hf import HFRuntime

        return HFRuntime(validated, device=device, batch_size=batch_size, seed=seed, sources=sources)
    raise ValueError(f"unknown backend {backend!r}: use hf or vllm")
