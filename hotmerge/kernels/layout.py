"""The resident layout of every merge: the sources, the base and the segment table.

The sources are stored, not the deltas: delta = X - B is recomputed in the kernel
(one subtract and one rounding per element, free in a memory-bound pass) and
rounded to the source dtype exactly as mergekit computes it, so the task-arithmetic
family sees mergekit's very deltas, while linear and slerp, which mergekit computes
from the sources, stay exact too: storing bf16 deltas instead would make them
B + round(X - B) != X. Measured on 2^20 N(0,1) bf16 weights, 3 sources, linear with
weights (0.3, 0.5, 0.7): deltas of 0.02 / 0.2 / 1.0 x the weights' scale put 0.7% /
6.7% / 25% of the outputs off (mostly by 1 ulp), versus bit-exact from the sources.
The memory cost is the same: M 16-bit buffers.

  FlatSources.models  [M, total]  the M source models' weights X_i, flat, bf16/fp16
  FlatSources.base    [total]     the base model (None for linear/slerp-only use)
  FlatSources.segments            Segment(offset, numel, tensor_key, row_len, ...)
  FlatSources.stats               stats.SourceStats (histograms, norms, ...)
  FlatSources.stats_cache         stats_cache.StatsCache: where they are kept on disk, or None
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from . import reference as R
from .stats import SourceStats, compute_stats


CHUNK = 1 << 20  # elements per merge_chunk_torch step (bounds float32 scratch)



def tensor_key_of(name: str) -> int:
    """Stable 64-bit key of a tensor name (keys the tensor's random stream)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")



@dataclass
class Segment:
    """One source tensor (or one row range of a fused live parameter) in the flat layout."""

    offset: int  # first element in the flat buffers
    numel: int
    tensor_key: int = 0  # random-stream key (tensor_key_of(name) by default in from_tensors)
    row_len: int = 0  # della ranks within rows of this length (2-D: columns); 0: whole segment
    elem_offset: int = 0  # index of the first element within its tensor's random stream
    # A block of rows of elem_cols elements each, elem_stride apart in its tensor (a column
    # shard under tensor parallelism): element i has index
    # elem_offset + (i // elem_cols) * elem_stride + i % elem_cols. 0: contiguous.
    elem_cols: int = 0
    elem_stride: int = 0
    param_row: int = -1  # row of the parameter arrays this segment uses; -1: its own index
    name: str = ""
    # its whole tensor's shape (arcee_fusion's softmax rows, the per-row methods' rows);
    # (): one 1-D tensor of numel elements
    shape: tuple = ()

    def last_element(self) -> int:
        """Index of its last element in its tensor's random stream (elem_offset - 1 if empty)."""
        if not self.elem_cols or not self.numel:
            return self.elem_offset + self.numel - 1
        return self.elem_offset + (self.numel // self.elem_cols - 1) * self.elem_stride + self.elem_cols - 1

    def elements(self, lo: int, hi: int, device=None) -> torch.Tensor:
        """Random-stream indices of its elements [lo, hi) (int32 bits where they fit)."""
        if not self.elem_cols:
            return R.element_indices(self.elem_offset + lo, self.elem_offset + hi, device)
        i = torch.arange(lo, hi, dtype=torch.int64, device=device)
        e = self.elem_offset + (i // self.elem_cols) * self.elem_stride + i % self.elem_cols
        return e.to(torch.int32) if self.last_element() < 1 << 31 else e



class FlatSources:
    """The resident inputs of every merge: sources, base and segment table.

    models: [M, total] contiguous bf16/fp16, the source models' weights (not deltas);
    base: [total] or None (linear / slerp only); model_keys: random-stream key of
    each source (default 0..M-1). After changing the buffers in place, set
    `stats = None` (and `stats_cache = None`: its key describes the files the buffers
    were read from) so the next build_table recomputes the statistics.
    """

    def __init__(
        self,
        models: torch.Tensor,
        segments: Sequence[Segment],
        base: Optional[torch.Tensor] = None,
        model_keys: Optional[Sequence[int]] = None,
    ):
        if models.dim() != 2 or not models.is_contiguous():
            raise ValueError("models must be a contiguous [M, total] tensor")
        if models.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"sources must be bf16 or fp16, got {models.dtype}")
        if base is not None:
            if base.shape != models.shape[1:] or base.dtype != models.dtype:
                raise ValueError("base must be a [total] tensor of the sources' dtype")
            if base.device != models.device or not base.is_contiguous():
                raise ValueError("base must be contiguous, on the sources' device")
        total = models.shape[1]
        for s in segments:
            if s.offset < 0 or s.numel < 0 or s.offset + s.numel > total:
                raise ValueError(f"segment {s.name!r} lies outside the flat buffers")
            if s.last_element() >= 1 << 32:
                raise ValueError(f"segment {s.name!r}: random streams index < 2^32 elements")
            if s.elem_cols and s.numel % s.elem_cols:
                raise ValueError(f"segment {s.name!r}: {s.numel} elements are not rows of {s.elem_cols}")
        self.models = models
        self.base = base
        self.segments = list(segments)
        self.model_keys = list(range(models.shape[0])) if model_keys is None else list(model_keys)
        if len(self.model_keys) != models.shape[0]:
            raise ValueError("one model key per source")
        self.stats: Optional[SourceStats] = None
        self._stats_flags = (False, False)
        # Where the statistics are loaded from and saved to (stats_cache.StatsCache), if
        # anywhere; the buffers must not change while one is attached.
        self.stats_cache = None
        self._stats_unsaved = False
        self._stream_keys: dict = {}
        self._launch: dict = {}  # backend caches (block maps, device tables)
        # Elements per chunk when the buffers live in host memory and each merge streams
        # them to the output's device (streaming.py); None: resident beside the output.
        self.streamed: Optional[int] = None
        self.stream_device: Optional[torch.device] = None  # where statistics are computed then
        self.device_base: Optional[torch.Tensor] = None  # streamed: the base kept on that device
        # Tensor-parallel shards: segment j holds shards[j] of its tensor, and the load-time
        # statistics are those of the whole tensors, computed across `group` (sharded.py).
        self.shards: Optional[list] = None
        self.group = None

    @classmethod
    def allocate(
        cls,
        shapes: Sequence[Sequence[int]],
        names: Sequence[str],
        n_models: int,
        *,
        with_base: bool,
        dtype: torch.dtype,
        device="cpu",
        model_keys: Optional[Sequence[int]] = None,
        align: int = 16,
        pin_memory: bool = False,
    ) -> "FlatSources":
        """A zeroed layout of one segment per tensor, to be filled with `write` in place.

        pin_memory: page-locked host buffers (device "cpu"), for sources streamed to a GPU.

        Segment j is tensor j; its tensor_key is tensor_key_of(names[j]). Segment
        offsets and the total are padded to multiples of `align` elements (zeros),
        which lets the GPU kernel use aligned vector loads. Filling tensor by tensor
        keeps the load's peak memory at the layout plus one tensor."""
        segments, offset = [], 0
        for shape, name in zip(shapes, names):
            numel = int(np.prod(shape, dtype=np.int64))
            segments.append(Segment(offset=offset, numel=numel, tensor_key=tensor_key_of(name),
                                    row_len=R.default_row_len(shape), name=name,
                                    shape=tuple(int(d) for d in shape)))
            offset += -(-numel // align) * align
        models = torch.zeros((n_models, offset), dtype=dtype, device=device, pin_memory=pin_memory)
        base = torch.zeros(offset, dtype=dtype, device=device, pin_memory=pin_memory) if with_base else None
        return cls(models, segments, base, model_keys)

    def write(self, model: Optional[int], j: int, tensor: torch.Tensor) -> None:
        """Copy one source tensor into segment j of model `model` (None: the base)."""
        seg = self.segments[j]
        if tensor.numel() != seg.numel:
            raise ValueError(f"segment {seg.name!r} holds {seg.numel} elements, got {tensor.numel()}")
        row = self.base if model is None else self.models[model]
        row[seg.offset: seg.offset + seg.numel] = tensor.reshape(-1).to(device=row.device, dtype=row.dtype)

    @classmethod
    def from_tensors(
        cls,
        models: Sequence[Sequence[torch.Tensor]],
        base: Optional[Sequence[torch.Tensor]] = None,
        names: Optional[Sequence[str]] = None,
        *,
        device=None,
        dtype: Optional[torch.dtype] = None,
        model_keys: Optional[Sequence[int]] = None,
        align: int = 16,
    ) -> "FlatSources":
        """Pack per-model lists of tensors (same shapes across models) into one layout."""
        ref = models[0]
        names = list(names) if names is not None else [str(j) for j in range(len(ref))]
        flat = cls.allocate([t.shape for t in ref], names, len(models), with_base=base is not None,
                            dtype=dtype or ref[0].dtype, device=device if device is not None else ref[0].device,
                            model_keys=model_keys, align=align)
        for m, tensors in enumerate([*models, base] if base is not None else models):
            if len(tensors) != len(ref) or any(a.shape != b.shape for a, b in zip(tensors, ref)):
                raise ValueError("every model must have the same tensors and shapes")
            for j, t in enumerate(tensors):
                flat.write(None if m == len(models) else m, j, t)
        return flat

    def stream_to(self, device, chunk: Optional[int] = None, base_on_device: bool = False) -> "FlatSources":
        """Keep these host buffers where they are and stream them to `device` in chunks of
        `chunk` elements for every merge (streaming.py); the load-time statistics are
        computed on `device` too, chunk by chunk. base_on_device: a copy of the base is kept
        on `device` (where it fits there) and only the sources stream; the base must not
        change afterwards."""
        from .streaming import default_chunk

        if self.device.type != "cpu":
            raise ValueError(f"streamed sources live in host memory, not on {self.device}")
        self.streamed = int(chunk or default_chunk(device))
        self.stream_device = torch.device(device)
        self.device_base = (self.base.to(self.stream_device, copy=True)
                            if base_on_device and self.base is not None else None)
        return self

    @property
    def n_models(self) -> int:
        return self.models.shape[0]

    @property
    def total(self) -> int:
        return self.models.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.models.dtype

    @property
    def device(self) -> torch.device:
        return self.models.device

    def param_rows(self) -> np.ndarray:
        return np.array([s.param_row if s.param_row >= 0 else j for j, s in enumerate(self.segments)],
                        dtype=np.int64)

    def compute_stats(self, *, della: bool = False, slerp: bool = False) -> SourceStats:
        """Load-time statistics (see stats.py; of the whole tensors for shards, sharded.py),
        taken from the stats cache when one is attached and holds them; kept in self.stats."""
        cached = self.stats_cache.load(self, della, slerp) if self.stats_cache is not None else None
        if cached is not None:
            self.stats = cached
        elif self.shards is not None:
            from .sharded import shard_stats

            self.stats = shard_stats(self, self.shards, self.group, della=della, slerp=slerp)
        else:
            self.stats = compute_stats(self, della=della, slerp=slerp)
        self._stats_flags = (della, slerp)
        self._stats_unsaved = cached is None and self.stats_cache is not None
        return self.stats

    def ensure_stats(self, *, della: bool = False, slerp: bool = False, save: bool = True) -> SourceStats:
        """self.stats with at least these parts. save: write freshly computed statistics to
        the stats cache now (False defers it to a later call: the vLLM worker computes them
        at start-up and saves them with the first candidate, so a start-up that fails
        leaves no cache behind in a run directory it never created)."""
        have_della, have_slerp = self._stats_flags
        if self.stats is None or (della and not have_della) or (slerp and not have_slerp):
            self.compute_stats(della=della or have_della, slerp=slerp or have_slerp)
        if save and self._stats_unsaved:
            self._stats_unsaved = False
            self.stats_cache.save(self, *self._stats_flags)
        return self.stats

    def stream_keys(self, seed: int) -> np.ndarray:
        """[S, M, 2] uint32 random-stream keys for `seed` (cached: candidate-independent)."""
        if seed not in self._stream_keys:
            k = np.zeros((len(self.segments), self.n_models, 2), dtype=np.uint32)
            for j, s in enumerate(self.segments):
                for m, mk in enumerate(self.model_keys):
                    k[j, m] = R.stream_keys(seed, mk, s.tensor_key)
            self._stream_keys[seed] = k
        return self._stream_keys[seed]
