"""`apply`: write one candidate into the live weights, on the backend its device calls for.

Usage:
    flat = FlatSources.from_tensors([model_a_tensors, model_b_tensors], base_tensors, names)
    table = build_table("ties", flat, {"weight": w, "density": d}, normalize=True)
    apply(flat, table, out)      # out: flat [total] tensor, or one live tensor per segment

Backends: Triton on CUDA (triton_merge: one launch for all segments, plus one
reduction launch when a random mask needs its L1 rescale); on the CPU the fast path
and C kernel (cpu_backend) for segments proven finite, the chunked torch path
(torch_backend) for the rest. All give the same bits. A candidate whose output would
be non-finite raises NonFiniteMergeError with the output untouched (finite.py).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .layout import FlatSources
from .table import CoefficientTable
from .finite import NonFiniteMergeError, unproven_segments
from .torch_backend import ROW_KINDS, chunks, merge_chunk_torch, out_slice
from . import cpu_backend as cpu


def _check_out(flat: FlatSources, out) -> None:
    if isinstance(out, torch.Tensor):
        if out.shape != (flat.total,) or out.dtype != flat.dtype or out.device != flat.device:
            raise ValueError(f"flat output must be [{flat.total}] {flat.dtype} on {flat.device}")
        if not out.is_contiguous():
            raise ValueError("flat output must be contiguous")
        return
    if len(out) != len(flat.segments):
        raise ValueError("one output tensor per segment")
    for s, o in zip(flat.segments, out):
        if o.numel() != s.numel or o.dtype != flat.dtype or o.device != flat.device:
            raise ValueError(f"output for segment {s.name!r} must have {s.numel} {flat.dtype} elements")
        if not o.is_contiguous():
            raise ValueError(f"output for segment {s.name!r} must be contiguous")



def apply(
    flat: FlatSources,
    table: CoefficientTable,
    out: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    backend: str = "auto",
    block: Optional[int] = None,
) -> None:
    """Write the candidate described by `table` into `out`.

    out: a flat [total] tensor, or one contiguous tensor per segment (e.g. the live
    parameters, or row-range views of fused ones), written in place.
    backend: "torch", "triton", or "auto" (Triton on CUDA, torch otherwise).
    Raises NonFiniteMergeError, leaving `out` untouched, if any value would be inf/NaN.
    Sources held in host memory (flat.streamed) are streamed to out's device in chunks.
    """
    if flat.shards is not None and table.needs_l1_pass:
        from .sharded import with_masked_l1  # a tensor-parallel shard: norms of the whole tensors

        table = with_masked_l1(flat, table, backend=backend, block=block)
    if flat.streamed:
        from . import streaming

        streaming.apply(flat, table, out, backend=backend, block=block)
        return
    _check_out(flat, out)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "auto":
        backend = "triton" if flat.device.type == "cuda" else "torch"
    if table.kind in ROW_KINDS:
        backend = "torch"  # per-row coefficients: torch operations on every device
    if backend == "triton":
        from . import triton_merge as T

        kept = T.l1_kept(flat, table, block=block) if table.needs_l1_pass else None
        scale = table.scales(kept)
        suspects = unproven_segments(flat, table, scale)
        if suspects:
            bad = T.nonfinite_segments(flat, table, scale, suspects, block=block)
            if bad:
                raise NonFiniteMergeError(bad, [flat.segments[j].name for j in bad])
        T.merge(flat, table, scale, out, block=block)
        return

    fast = cpu.fast_ok(flat) and table.kind not in ROW_KINDS
    if fast and table.needs_l1_pass and cpu.stream_ok(flat, table):
        cpu.apply_streamed(flat, table, out, cpu.scratch(flat))
        return
    kept = cpu.l1_kept(flat, table, skip_unused=True) if table.needs_l1_pass else None
    scale = table.scales(kept)
    bad = []
    unproven = unproven_segments(flat, table, scale)
    for j in unproven:
        for lo, hi in chunks(flat.segments[j].numel):
            if not torch.isfinite(merge_chunk_torch(flat, table, scale, j, lo, hi)).all():
                bad.append(j)
                break
    if bad:
        raise NonFiniteMergeError(bad, [flat.segments[j].name for j in bad])
    scr = cpu.scratch(flat) if fast else None
    unproven = set(unproven)
    for j, seg in enumerate(flat.segments):
        if fast and j not in unproven and cpu.fast_segment_ok(seg):
            cpu.merge_segment_fast(flat, table, scale, j, out, scr)
            continue
        for lo, hi in chunks(seg.numel):
            out_slice(out, flat, j, lo, hi).copy_(merge_chunk_torch(flat, table, scale, j, lo, hi))
