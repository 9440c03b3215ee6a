"""Sources in host memory, streamed to the merge in chunks: `--sources pinned`.

When the device cannot hold the sources beside the live model, FlatSources keeps
them in page-locked host memory, allocated once at load
(`FlatSources.allocate(..., pin_memory=True)`), and `flat.streamed` holds the chunk
length in elements. The base stays on the device where it fits there
(`stream_to(..., base_on_device=True)`: only the sources stream), else it streams too.
Each candidate then walks the flat buffers in chunks: chunk k's slice of every source
row (and of the base where it streams, and of DELLA's rank codes) is copied into a
staging buffer on the output's device, and the same kernels (dispatch.apply) merge it
from there. A chunk may end inside a tensor: each
segment it cuts is seen as a shorter segment whose `elem_offset` keeps its random
stream, with the whole tensor's row of the coefficient table and its whole-tensor
statistics (histogram cuts, L1 norms, slerp constants, rank codes: computed once at
load from the host buffers, never per chunk). So the result is bit-equal to the
resident merge.

On CUDA there are two staging buffers, and the copies run on a second stream:
chunk k+1 is copied while the kernel merges chunk k (events order a buffer's next
copy after the kernel that read it). On the CPU there is nothing to page-lock and
one staging buffer: the same walk, copy then merge.

A candidate's steps, each over the chunks:
  1. random masks with rescale (DARE, DELLA): the masked L1 norms, summed per
     (tensor, model) from every chunk's partial sums. Those sums are exact (the
     guard cpu_backend._l1_sum_is_exact), so their order does not change them; a
     pair the guard does not clear is measured by the resident path's own reference
     sum over the host buffers. This is a second pass over the sources.
  2. the finite check: segments the load-time bounds cannot prove finite are
     merged into a scratch buffer first; inf/NaN raises NonFiniteMergeError with
     the output untouched (finite.py).
  3. the merge, written into the output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from .finite import NonFiniteMergeError, unproven_segments
from .layout import FlatSources, Segment
from .stats import SourceStats
from .table import CoefficientTable

DEFAULT_CHUNK = 1 << 24  # elements per chunk on CUDA: 32 MiB per bf16 row
# On the CPU: few chunks, each merged by the C kernel across threads (measured on 2 cores,
# 3 sources of 8M elements: 2^18-element chunks cost 2.0-2.5x the resident merge, 2^22 1.2-1.8x;
# the copy into staging is one more pass over the sources' memory)
CPU_CHUNK = 1 << 22
ALIGN = 1024  # chunk lengths are whole Triton blocks (and 16-byte vectors)


def default_chunk(device: torch.device) -> int:
    return CPU_CHUNK if torch.device(device).type == "cpu" else DEFAULT_CHUNK


@dataclass
class _Chunk:
    lo: int  # flat range [lo, hi) of the host buffers
    hi: int
    segments: List[int]  # the segments it cuts (non-empty parts only)
    starts: List[int]  # where each part starts within its segment
    buffer: int  # staging buffer index
    view: FlatSources  # the part layout over that staging buffer


class _Staging:
    """Device buffers a chunk is copied into, and the chunk layouts over them."""

    def __init__(self, flat: FlatSources, device: torch.device, chunk: int):
        self.device = device
        self.chunk = chunk
        self.cuda = device.type == "cuda"
        n_buffers = 2 if self.cuda else 1
        M = flat.n_models
        self.models = [torch.empty(M * chunk, dtype=flat.dtype, device=device) for _ in range(n_buffers)]
        staged_base = flat.base is not None and flat.device_base is None
        self.base = [torch.empty(chunk, dtype=flat.dtype, device=device) if staged_base else None
                     for _ in range(n_buffers)]
        self.codes: list = [None] * n_buffers  # della's rank codes, allocated on first use
        self.chunks = self._chunks(flat, n_buffers)
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device=device)
            self.copied = [torch.cuda.Event() for _ in range(n_buffers)]
            self.merged = [torch.cuda.Event() for _ in range(n_buffers)]

    def _chunks(self, flat: FlatSources, n_buffers: int) -> List[_Chunk]:
        chunks = []
        M = flat.n_models
        lo = 0
        while lo < flat.total:
            hi = _chunk_end(flat, lo, self.chunk)
            n, b = hi - lo, len(chunks) % n_buffers
            parts, starts, segments = [], [], []
            for j, s in enumerate(flat.segments):
                a, e = max(lo, s.offset), min(hi, s.offset + s.numel)
                if a >= e:
                    continue
                segments.append(j)
                starts.append(a - s.offset)
                if s.elem_cols:  # whole rows of a column shard (_chunk_end)
                    elem = s.elem_offset + (a - s.offset) // s.elem_cols * s.elem_stride
                else:
                    elem = s.elem_offset + a - s.offset
                parts.append(Segment(offset=a - lo, numel=e - a, tensor_key=s.tensor_key, row_len=s.row_len,
                                     elem_offset=elem, elem_cols=s.elem_cols, elem_stride=s.elem_stride,
                                     name=s.name, shape=s.shape))
            if not parts:
                lo = hi
                continue
            models = self.models[b][: M * n].view(M, n)
            if flat.device_base is not None:  # the base on the device: the chunk's slice of it
                base = flat.device_base[lo:hi]
            else:
                base = self.base[b][:n] if self.base[b] is not None else None
            view = FlatSources(models, parts, base, flat.model_keys)
            chunks.append(_Chunk(lo, hi, segments, starts, b, view))
            lo = hi
        return chunks

    def codes_buffer(self, b: int, M: int) -> torch.Tensor:
        if self.codes[b] is None:
            self.codes[b] = torch.empty(M * self.chunk, dtype=torch.uint8, device=self.device)
        return self.codes[b]


def _chunk_end(flat: FlatSources, lo: int, chunk: int) -> int:
    """End of the chunk that starts at lo: lo + chunk, or earlier so that a column shard
    (a segment of rows elem_stride apart in its tensor) is cut between rows."""
    hi = min(flat.total, lo + chunk)
    for s in flat.segments:
        if s.elem_cols and s.offset < hi < s.offset + s.numel:
            cut = s.offset + (hi - s.offset) // s.elem_cols * s.elem_cols
            if cut <= lo:
                raise ValueError(f"segment {s.name!r}: a row of {s.elem_cols} elements is longer than "
                                 f"a chunk of {chunk}")
            return cut
    return hi


def staging(flat: FlatSources, device) -> _Staging:
    """flat's staging on `device` (built once, kept with the layout)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = ("staging", str(device), flat.streamed, flat.device_base is not None)
    if key not in flat._launch:
        flat._launch[key] = _Staging(flat, device, flat.streamed)
    return flat._launch[key]


def _rows(value, idx: List[int], S: int):
    """The rows idx of a per-segment statistic or table column ([S, ...] array or list)."""
    if isinstance(value, np.ndarray) and value.ndim and value.shape[0] == S:
        return value[idx]
    if isinstance(value, list) and len(value) == S:
        return [value[j] for j in idx]
    return value


def _sub_stats(st: SourceStats, idx: List[int], S: int, codes: Optional[torch.Tensor]) -> SourceStats:
    """The statistics of segments idx (their whole tensors'), the chunk's rank codes."""
    rows = {f.name: _rows(getattr(st, f.name), idx, S) for f in dataclasses.fields(st)
            if f.name not in ("rank_codes", "extras")}
    return SourceStats(**rows, rank_codes=codes if st.rank_codes is not None else None)


def _sub_table(table: CoefficientTable, idx: List[int], S: int, codes: Optional[torch.Tensor],
               l1_kept: Optional[np.ndarray] = None) -> CoefficientTable:
    """The table rows of segments idx; per-element inputs ([M, total]) of the chunk."""
    rows = {f.name: _rows(getattr(table, f.name), idx, S) for f in dataclasses.fields(table)
            if f.name not in ("rank_codes", "l1_kept")}
    kept = table.l1_kept if l1_kept is None else l1_kept
    return dataclasses.replace(table, **rows, l1_kept=kept[idx],
                               rank_codes=codes if table.rank_codes is not None else None)


def _out_parts(flat: FlatSources, c: _Chunk, out):
    """The output of chunk c: a flat slice, or one slice per segment part."""
    if isinstance(out, torch.Tensor):
        return out[c.lo: c.hi]
    return [out[j].view(-1)[s: s + p.numel] for j, s, p in zip(c.segments, c.starts, c.view.segments)]


def _walk(flat: FlatSources, st: _Staging, table: CoefficientTable, chunks: List[_Chunk], work):
    """Stage each chunk on the device and call work(chunk, chunk table): on CUDA the copy
    of chunk k+1 overlaps work on chunk k."""
    ranked = table.rank_codes is not None
    M = flat.n_models
    compute = torch.cuda.current_stream(st.device) if st.cuda else None
    for c in chunks:
        b, n = c.buffer, c.hi - c.lo
        codes = st.codes_buffer(b, M)[: M * n].view(M, n) if ranked else None
        if st.cuda:
            with torch.cuda.stream(st.copy_stream):
                st.copy_stream.wait_event(st.merged[b])  # the last kernel that read buffer b is done
                _copy(flat, table, c, codes)
                st.copied[b].record(st.copy_stream)
            compute.wait_event(st.copied[b])
        else:
            _copy(flat, table, c, codes)
        work(c, codes)
        if st.cuda:
            st.merged[b].record(compute)


def _copy(flat: FlatSources, table: CoefficientTable, c: _Chunk, codes) -> None:
    view = c.view
    for m in range(flat.n_models):  # one contiguous copy per row
        view.models[m].copy_(flat.models[m, c.lo: c.hi], non_blocking=True)
    if view.base is not None and flat.device_base is None:
        view.base.copy_(flat.base[c.lo: c.hi], non_blocking=True)
    if codes is not None:
        for m in range(flat.n_models):
            codes[m].copy_(table.rank_codes[m, c.lo: c.hi], non_blocking=True)


def _view(c: _Chunk, st_all: SourceStats, codes) -> FlatSources:
    c.view.stats = _sub_stats(st_all, c.segments, len(st_all.max_source), codes)
    return c.view


def _measured_l1(flat: FlatSources, st: _Staging, table: CoefficientTable, backend: str,
                 block: Optional[int]) -> np.ndarray:
    """table.l1_kept with every pair that apply needs measured (step 1)."""
    from . import cpu_backend as cpu
    from .torch_backend import l1_kept_reference

    S = len(flat.segments)
    kept = table.l1_kept.copy()
    need = table.sparsified & np.isnan(kept) & (table.weight != 0)
    exact = np.zeros_like(need)
    for j, m in zip(*np.nonzero(need)):
        exact[j, m] = cpu._l1_sum_is_exact(flat, int(j), int(m))
    kept[table.sparsified & np.isnan(kept)] = 0.0  # unused pairs: scale 0 whatever the rescale
    if exact.any():
        chunks = [c for c in st.chunks if exact[c.segments].any()]
        partial = np.where(exact, np.nan, 0.0)  # measure only the exact pairs in a chunk
        sums = []

        def work(c, codes):
            view = _view(c, flat.stats, codes)
            sub = _sub_table(table, c.segments, S, codes, partial)
            if backend == "triton" or (backend == "auto" and view.device.type == "cuda"):
                from . import triton_merge as T

                sums.append((c.segments, T.l1_sums(view, sub, block=block)))
            else:
                sums.append((c.segments, np.nan_to_num(cpu.l1_kept(view, sub, skip_unused=True))))

        _walk(flat, st, table, chunks, work)
        for segs, s in sums:
            s = s.cpu().numpy() if isinstance(s, torch.Tensor) else s
            np.add.at(kept, segs, np.where(exact[segs], s, 0.0))
    for j, m in zip(*np.nonzero(need & ~exact)):
        kept[j, m] = l1_kept_reference(flat, table, int(j), int(m))
    return kept


def apply(flat: FlatSources, table: CoefficientTable, out, *, backend: str = "auto",
          block: Optional[int] = None) -> None:
    """dispatch.apply for sources held in host memory (flat.streamed): the same bits."""
    from .dispatch import apply as apply_resident

    device = out.device if isinstance(out, torch.Tensor) else (out[0].device if len(out) else flat.device)
    _check_out(flat, out, device)
    st = staging(flat, device)
    S = len(flat.segments)
    if table.needs_l1_pass:
        table = dataclasses.replace(table, l1_kept=_measured_l1(flat, st, table, backend, block))
    suspects = set(unproven_segments(flat, table, table.scales()))
    if suspects:  # step 2: a dry run of the chunks that hold them
        scratch = torch.empty(st.chunk, dtype=flat.dtype, device=device)
        bad: set = set()

        def check(c, codes):
            try:
                apply_resident(_view(c, flat.stats, codes), _sub_table(table, c.segments, S, codes),
                               scratch[: c.hi - c.lo], backend=backend, block=block)
            except NonFiniteMergeError as error:
                bad.update(c.segments[i] for i in error.segments)

        _walk(flat, st, table, [c for c in st.chunks if suspects.intersection(c.segments)], check)
        if bad:
            bad_list = sorted(bad)
            raise NonFiniteMergeError(bad_list, [flat.segments[j].name for j in bad_list])

    def write(c, codes):
        apply_resident(_view(c, flat.stats, codes), _sub_table(table, c.segments, S, codes),
                       _out_parts(flat, c, out), backend=backend, block=block)

    _walk(flat, st, table, st.chunks, write)


def _check_out(flat: FlatSources, out, device: torch.device) -> None:
    if isinstance(out, torch.Tensor):
        if out.shape != (flat.total,) or out.dtype != flat.dtype or not out.is_contiguous():
            raise ValueError(f"flat output must be a contiguous [{flat.total}] {flat.dtype} tensor")
        return
    if len(out) != len(flat.segments):
        raise ValueError("one output tensor per segment")
    for s, o in zip(flat.segments, out):
        if o.numel() != s.numel or o.dtype != flat.dtype or not o.is_contiguous() or o.device != device:
            raise ValueError(f"output for segment {s.name!r} must be {s.numel} contiguous {flat.dtype} "
                             f"elements on {device}")
