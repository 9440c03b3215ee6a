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

import glob
import os
from typing import Optional, Protocol

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

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            if tp > gpus:
                raise ConfigError(f"--tensor-parallel-size {tp} needs {tp} GPUs but this machine has {gpus}: "
                                  f"use a --tensor-parallel-size of at most {max(gpus, 1)}")
        else:  # vLLM's CPU build: one worker per tensor-parallel rank, each on cores of its own
            cores = len(os.sched_getaffinity(0))
            if tp > cores:
                raise ConfigError(f"--tensor-parallel-size {tp} runs {tp} vLLM CPU workers, each on cores of "
                                  f"its own, but this process may use {cores} cores: use a "
                                  f"--tensor-parallel-size of at most {cores}")


def cpu_threads_bind(tp: int) -> Optional[str]:
    """vLLM-CPU's VLLM_CPU_OMP_THREADS_BIND for tp workers, where neither the user nor vLLM's
    default can bind them (None: leave it): vLLM binds one worker per NUMA node and refuses
    more workers than nodes, so then the cores this process may use are dealt out in tp
    contiguous groups ("0|1", "0,1|2,3")."""
    if tp <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return None
    cores = sorted(os.sched_getaffinity(0))
    nodes = 0
    for node in glob.glob("/sys/devices/system/node/node[0-9]*/cpulist"):
        with open(node) as f:
            if any(c in cores for c in _id_list(f.read())):
                nodes += 1
    if nodes >= tp:
        return None
    if tp > len(cores):
        raise ConfigError(f"{tp} vLLM CPU workers need {tp} cores, this process may use {len(cores)}")
    share, extra = divmod(len(cores), tp)
    groups, start = [], 0
    for rank in range(tp):
        size = share + (rank < extra)
        group = cores[start: start + size]
        start += size
        groups.append(",".join(str(c) for c in group))
    return "|".join(groups)


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


def _id_list(text: str) -> list:
    """The ids of a Linux cpulist ("0-3,8")."""
    ids = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids
