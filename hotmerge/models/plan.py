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
SCE_KEYS = 32768  # sce's variance keys: 16-bit patterns
FLOAT64 = 8


# Where the sources (and the base) live: beside the live model on its device, or in
# page-locked host memory, streamed to the device in chunks for every merge
# (kernels/streaming.py: the same bits), the base staying on the device where it fits
# there. auto: device where they fit, else pinned.
SOURCES = ("device", "pinned", "auto")
DEVICE_MARGIN = 2 << 30  # activations, allocator slack and staging kept free beside the sources


@dataclass(frozen=True)
class SourcesChoice:
    placement: str  # "device" or "pinned"
    reason: str
    base_on_device: bool = False  # pinned: the base stays on the device, only the sources stream

    def __str__(self) -> str:
        return f"sources {self.placement}: {self.reason}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def choose_sources(requested: str, *, resident_bytes: int, free_bytes: int | None, device: str,
                   base_bytes: int = 0) -> SourcesChoice:
    """The placement of resident_bytes of sources (and base_bytes of base among them) beside a
    live model on `device` with free_bytes free after it (None: unknown, as on the CPU). A
    placement asked for that cannot fit is refused in one line naming the one that does.
    Pinned keeps the base on the device where it fits there (never where free_bytes is
    unknown), so that only the sources stream."""
    if requested not in SOURCES:
        raise ConfigError(f"--sources {requested}: use one of {', '.join(SOURCES)}")
    fits = free_bytes is None or resident_bytes + DEVICE_MARGIN <= free_bytes
    room = "" if free_bytes is None else f" ({_gib(free_bytes)} free on {device}, {_gib(DEVICE_MARGIN)} kept back)"
    if requested == "device":
        if not fits:
            raise ConfigError(f"--sources device: the sources need {_gib(resident_bytes)} on {device} but do not "
                              f"fit{room}: use --sources pinned (host memory, streamed) or --sources auto")
        return SourcesChoice("device", f"asked for; {_gib(resident_bytes)} beside the live model{room}")
    if requested != "pinned" and fits:
        return SourcesChoice("device", f"{_gib(resident_bytes)} fit beside the live model{room}")
    base_on_device = bool(base_bytes) and free_bytes is not None and base_bytes + DEVICE_MARGIN <= free_bytes
    streamed = resident_bytes - base_bytes if base_on_device else resident_bytes
    where = f"{_gib(streamed)} in host memory, streamed to {device}"
    if base_on_device:
        where += f"; the base ({_gib(base_bytes)}) stays on {device}"
    if requested == "pinned":
        return SourcesChoice("pinned", f"asked for; {where}", base_on_device)
    return SourcesChoice("pinned", f"{_gib(resident_bytes)} do not fit beside the live model{room}: {where}",
                         base_on_device)


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
    """(what, bytes) of the load-time statistics kernels/stats.py and kernels/table.py keep for
    `method` ("cached": evolve keeps them in <storage-path>/.stats-cache, kernels/stats_cache.py;
    sce's, ramplus_tl's and arcee_fusion's are computed at every start)."""
    rows = []
    if with_base:
        rows.append(("statistics: magnitude histograms (cached)", n_models * n_tensors * HISTOGRAM_BYTES))
    if method.needs_slerp_constants:
        # per tensor: the norms, the dot products between sources and, with a base, between deltas
        grams = 2 if with_base else 1
        rows.append(("statistics: norms and dot products (cached)",
                     n_tensors * (n_models + grams * n_models * n_models) * FLOAT64))
    if method.needs_rank_codes:
        rows.append(("statistics: della rank codes (cached)",
                     n_models * parameters * method.rank_code_bytes_per_parameter))
    elif method.rank_code_bytes_per_parameter:  # one model's codes are set, the array holds every model's
        rows.append((f"statistics: {method.name} keep codes",
                     n_models * parameters * method.rank_code_bytes_per_parameter))
    if method.engine == "sce":
        # per tensor, at most one bin per 16-bit variance key: its key, its count, each model's sum
        rows.append(("statistics: sce variance-key histograms",
                     n_tensors * SCE_KEYS * (2 + n_models) * FLOAT64))
    if method.name == "ramplus_tl":
        rows.append(("statistics: ramplus_tl shared and unique counts", n_tensors * 2 * n_models * FLOAT64))
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


# -- a plan for GPUs that need not be present ---------------------------------------------

HBM_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM: the device placement's apply floor
HOST_LINK_BANDWIDTH = 50e9  # bytes/s, PCIe Gen5 x16 per direction in theory: the pinned floor
STAGING_CHUNK = 1 << 24  # elements per staged chunk on CUDA (kernels/streaming.py DEFAULT_CHUNK)


@dataclass
class GpuPlan:
    """Per GPU: what a run holds under tensor parallelism for each placement of the sources."""

    gpus: int
    tp: int
    gpu_memory: int
    host_memory: int | None
    live: int  # the live model's shard
    sources: int  # base and sources' shards (n_buffers copies)
    base: int  # the base's shard among them (0 without a base)
    staging: int  # pinned: two staged chunks of every streamed buffer
    statistics: int  # della's rank codes' shard (beside the sources)
    choice: SourcesChoice

    @property
    def engines(self) -> int:
        return self.gpus // self.tp

    @property
    def base_on_device(self) -> bool:
        """Under pinned: whether the base stays on the device (where it fits)."""
        return self.choice.placement == "pinned" and self.choice.base_on_device

    @property
    def streamed(self) -> int:
        """Pinned: the shards held in host memory and streamed for every merge."""
        return self.sources - (self.base if self.base_on_device else 0)

    def used(self, placement: str) -> int:
        if placement == "device":
            held = self.sources + self.statistics
        else:
            held = self.staging + (self.base if self.base_on_device else 0)
        return self.live + held + DEVICE_MARGIN

    def room(self, placement: str) -> int:
        """What is left for the KV cache on each GPU."""
        return self.gpu_memory - self.used(placement)

    @property
    def host_pinned(self) -> int:
        """Page-locked host memory of the machine for pinned: every GPU's streamed shards."""
        return self.gpus * (self.streamed + self.statistics)

    def floor_seconds(self, placement: str) -> float:
        """An apply's floor: every buffer read and the live shard written at HBM speed, or
        the streamed buffers over the host link."""
        if placement == "device":
            return (self.sources + 2 * self.live) / HBM_BANDWIDTH
        return self.streamed / HOST_LINK_BANDWIDTH


def gpu_plan(validated: ValidatedConfig, *, gpus: int, gpu_memory: int, tensor_parallel_size: int,
             sources: str = "auto", host_memory: int | None = None) -> GpuPlan:
    """The per-GPU plan for `gpus` GPUs of gpu_memory bytes at this tensor-parallel size; a
    setting that cannot work is refused in one line naming the smallest one that would."""
    if sources not in SOURCES:
        raise ConfigError(f"--sources {sources}: use one of {', '.join(SOURCES)}")
    tp = int(tensor_parallel_size)
    if tp < 1 or gpus < 1 or gpus % tp:
        raise ConfigError(f"--gpus {gpus} is not a multiple of --tensor-parallel-size {tp}: make it one")

    def at(tp_: int, want: str) -> GpuPlan:
        genome_cfg = validated.config.genome
        parameters = sum(t.numel for t in validated.reference.tensors.values())
        shard = -(-parameters * BYTES_PER_ELEMENT // tp_)
        n_buffers = len(genome_cfg.models) + (genome_cfg.base_model is not None)
        base = shard if genome_cfg.base_model is not None else 0
        method = get_method(genome_cfg.merge_method)
        codes = -(-len(genome_cfg.models) * parameters * method.rank_code_bytes_per_parameter // tp_)
        free = gpu_memory - shard
        choice = choose_sources(want, resident_bytes=n_buffers * shard + codes, free_bytes=free,
                                device=f"each of {gpus} GPUs at tensor-parallel size {tp_}", base_bytes=base)
        streamed_buffers = n_buffers - (1 if choice.base_on_device else 0)
        return GpuPlan(gpus=gpus, tp=tp_, gpu_memory=gpu_memory, host_memory=host_memory, live=shard,
                       sources=n_buffers * shard, base=base,
                       staging=2 * streamed_buffers * STAGING_CHUNK * BYTES_PER_ELEMENT, statistics=codes,
                       choice=choice)

    def works(tp_: int, want: str) -> bool:
        try:
            p = at(tp_, want)
        except ConfigError:
            return False
        return p.room(p.choice.placement) > 0 and (
            p.choice.placement == "device" or host_memory is None or p.host_pinned <= host_memory)

    sizes = [t for t in range(1, gpus + 1) if gpus % t == 0]
    if not works(tp, sources):
        fixes = []
        if sources != "pinned" and works(tp, "pinned"):
            fixes.append("--sources pinned")
        bigger = next((t for t in sizes if t > tp and works(t, sources)), None)
        if bigger is not None:
            fixes.append(f"--tensor-parallel-size {bigger}")
        p = at(tp, "pinned")
        what = (f"{validated.config.genome.merge_method} with {len(validated.config.genome.models)} sources at "
                f"tensor-parallel size {tp} on {gpus} GPUs of {_gib(gpu_memory)}")
        if fixes:
            raise ConfigError(f"{what} does not fit with --sources {sources}: use {' or '.join(fixes)}")
        if p.room("pinned") <= 0:
            raise ConfigError(f"{what}: the live model's shard alone ({_gib(p.live)} per GPU) leaves no room: use "
                              "more GPUs (a larger --tensor-parallel-size)")
        raise ConfigError(f"{what}: pinned sources need {_gib(p.host_pinned)} of host memory, more than "
                          f"{_gib(host_memory)}: use more host memory or fewer sources")
    return at(tp, sources)
