"""The memory plan of a run, computed from config.json and safetensors headers alone.

Where every byte goes on the device that holds the live model: the live weights,
the resident base and sources, the per-tensor statistics, and the room left for
the inference engine's KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hotmerge.config.evolve import ValidatedConfig
from hotmerge.errors import ConfigError
from hotmerge.kernels.methods import get_method

BYTES_PER_ELEMENT = 2  # bf16 everywhere
# Per (model, tensor): at most the 32768 |x| bit patterns that occur, each with its
# cumulative count and L1 (int64, int64, float64), built at load whenever there is a
# base (kernels/stats.py).
HISTOGRAM_BYTES = 32768 * 3 * 8
FLOAT64 = 8


# Where the sources (and the base) live: beside the live model on its device, or in
# page-locked host memory, streamed to the device in chunks for every merge
# (kernels/streaming.py: the same bits). auto: device where they fit, else pinned.
SOURCES = ("device", "pinned", "auto")
DEVICE_MARGIN = 2 << 30  # activations, allocator slack and staging kept free beside the sources


@dataclass(frozen=True)
class SourcesChoice:
    placement: str  # "device" or "pinned"
    reason: str

    def __str__(self) -> str:
        return f"sources {self.placement}: {self.reason}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def choose_sources(requested: str, *, resident_bytes: int, free_bytes: int | None, device: str) -> SourcesChoice:
    """The placement of resident_bytes of sources (and base) beside a live model on `device`
    with free_bytes free after it (None: unknown, as on the CPU). A placement asked for that
    cannot fit is refused in one line naming the one that does."""
    if requested not in SOURCES:
        raise ConfigError(f"--sources {requested}: use one of {', '.join(SOURCES)}")
    fits = free_bytes is None or resident_bytes + DEVICE_MARGIN <= free_bytes
    room = "" if free_bytes is None else f" ({_gib(free_bytes)} free on {device}, {_gib(DEVICE_MARGIN)} kept back)"
    if requested == "device":
        if not fits:
            raise ConfigError(f"--sources device: the sources need {_gib(resident_bytes)} on {device} but do not "
                              f"fit{room}: use --sources pinned (host memory, streamed) or --sources auto")
        return SourcesChoice("device", f"asked for; {_gib(resident_bytes)} beside the live model{room}")
    if requested == "pinned":
        return SourcesChoice("pinned", f"asked for; {_gib(resident_bytes)} in host memory, streamed to {device}")
    if fits:
        return SourcesChoice("device", f"{_gib(resident_bytes)} fit beside the live model{room}")
    return SourcesChoice("pinned", f"{_gib(resident_bytes)} do not fit beside the live model{room}: "
                                   f"in host memory, streamed to {device}")


def default_popsize(genome_size: int) -> int:
    """pycma's default population size."""
    return 4 + int(3 * math.log(genome_size))


@dataclass
class MemoryPlan:
    rows: list[tuple[str, int]]  # (what, bytes)
    device: str
    device_total: int | None
    genome_shape: tuple[int, ...]
    genome_size: int
    population: int

    @property
    def resident(self) -> int:
        return sum(b for _, b in self.rows)

    @property
    def kv_room(self) -> int | None:
        return None if self.device_total is None else self.device_total - self.resident


def memory_plan(validated: ValidatedConfig, population_size: int | None = None,
                device_total: int | None = None, device: str = "cpu") -> MemoryPlan:
    genome_cfg = validated.config.genome
    ref = validated.reference
    parameters = sum(t.numel for t in ref.tensors.values())
    model_bytes = parameters * BYTES_PER_ELEMENT
    n_models = len(genome_cfg.models)
    rows = [("live model", model_bytes)]
    if validated.config.compute_dtype == "float32":  # float32 weights, and the bf16 merge beside them
        rows = [("live model (float32)", 2 * model_bytes), ("merged weights (bf16)", model_bytes)]
    if genome_cfg.base_model is not None:
        rows.append(("base (resident)", model_bytes))
    rows.append((f"sources: {n_models} models (resident)", n_models * model_bytes))
    rows += statistics_rows(get_method(genome_cfg.merge_method), n_models, len(ref.tensors), parameters,
                            with_base=genome_cfg.base_model is not None)
    genome = validated.genome()
    return MemoryPlan(rows=rows, device=device, device_total=device_total,
                      genome_shape=genome.shape, genome_size=genome.size,
                      population=population_size or default_popsize(genome.size))


def statistics_rows(method, n_models: int, n_tensors: int, parameters: int, *, with_base: bool) -> list:
    """(what, bytes) of the load-time statistics kernels/stats.py keeps for `method`
    ("cached": evolve keeps them in <storage-path>/.stats-cache, kernels/stats_cache.py)."""
    rows = []
    if with_base:
        rows.append(("statistics: magnitude histograms (cached)", n_models * n_tensors * HISTOGRAM_BYTES))
    if method.needs_slerp_constants:
        # per tensor: the norms, the dot products between sources and, with a base, between deltas
        grams = 2 if with_base else 1
        rows.append(("statistics: norms and dot products (cached)",
                     n_tensors * (n_models + grams * n_models * n_models) * FLOAT64))
    if method.rank_code_bytes_per_parameter:
        rows.append(("statistics: della rank codes (cached)",
                     n_models * parameters * method.rank_code_bytes_per_parameter))
    return rows


def local_device_memory(device: str | None = None) -> tuple[str, int | None]:
    """(device name, total bytes) of the device a run would use here."""
    import torch

    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory
    try:
        import os

        return "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return "cpu", None
