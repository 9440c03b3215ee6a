"""Whole-tensor statistics of tensor-parallel shards, computed once at load across the group.

Under tensor parallelism each rank holds a block (a "box") of every split tensor:
rows (column-parallel layers, vocabulary-parallel embeddings) or columns
(row-parallel layers), some tensors whole on every rank (norms), some blocks held by
several ranks (replicated KV heads). A merge method with a whole-tensor statistic needs
that statistic over the whole tensor, not the shard. `shard_stats` computes a
SourceStats for a rank's segments equal to the one the whole tensors would give:

* magnitude histograms (the cuts of ties and breadcrumbs, the L1 norms of DARE and
  DELLA's rescale: stats.MagnitudeHistogram.l1): the bin counts of every distinct
  block, summed across the group; exact, so the cuts and norms are the
  tensor-parallel-size-1 values bit for bit;
* maxima (the finite-output bounds): the maximum across the group;
* norms and dot products (slerp, model_stock, nuslerp, multislerp): float64 partial
  sums of every distinct block, summed across the group (equal to the whole tensor's
  to float64 rounding: the order of the sum differs);
* DELLA's rank codes rank |delta| within rows of the whole tensor: where a rank's
  block holds whole rows they are its own; where it holds parts of rows (a column
  split, a split 1-D tensor) the magnitude keys of every block are gathered, the
  whole tensor's codes computed, and the rank keeps its block's.

The statistics of the methods with kernels of their own are taken at their first table
(kernels/table.py), through the two helpers at the end:

* sums (`summed_per_tensor`): sce's variance-key histogram with its squared deltas and
  ramplus_tl's shared and unique counts, summed over the distinct blocks (exact: counts,
  and float64 sums of 16-bit squares);
* whole tensors (`whole_tensor_values`): karcher iterates in 16-bit arithmetic over the
  whole tensor, and arcee_fusion takes a softmax along whole rows and quantiles over the
  whole tensor (or a sample drawn by index from it). Their inputs are gathered, one split
  tensor at a time, and every rank computes the tensor-parallel-size-1 result from them
  (a load-time cost: the tensor's inputs once in host memory per rank).

A block held by several ranks counts once (the lowest rank holding it contributes),
and the distinct blocks of a tensor must tile it exactly; anything else raises.
Random draws need no statistic: a segment's `elem_offset`, `elem_cols` and
`elem_stride` give each element its index in the whole tensor (layout.Segment), so
DARE and DELLA draw the very bits of the tensor-parallel-size-1 merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import reference as R
from .stats import MagnitudeHistogram, SourceStats, _fill_rank_codes, compute_stats

Box = Tuple[Tuple[int, int], ...]


@dataclass(frozen=True)
class Shard:
    """The block of its source tensor that one segment holds (row-major within the block)."""

    shape: Tuple[int, ...]  # the whole tensor's shape
    box: Box  # ((start, stop), ...) per dim

    @property
    def numel(self) -> int:
        return int(np.prod([b - a for a, b in self.box], dtype=np.int64))

    @property
    def whole(self) -> bool:
        return all(a == 0 and b == s for (a, b), s in zip(self.box, self.shape))

    @property
    def whole_rows(self) -> bool:
        """Holds whole rows (della's rows: dims 1.. of a tensor of 2 dims or more)."""
        return len(self.shape) >= 2 and all(a == 0 and b == s for (a, b), s in zip(self.box[1:], self.shape[1:]))


def element_layout(shard: Shard) -> tuple:
    """(elem_offset, elem_cols, elem_stride) of a block: the element at (r, c) of a 2-D block
    has index elem_offset + r * elem_stride + c in the whole tensor; elem_cols 0: the block is
    one contiguous range (row blocks, 1-D ranges, whole tensors)."""
    shape, box = shard.shape, shard.box
    if len(shape) == 0:
        return 0, 0, 0
    strides = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape))]
    offset = sum(a * s for (a, _), s in zip(box, strides))
    if len(shape) == 1 or shard.whole_rows:
        return offset, 0, 0
    if len(shape) == 2:
        return offset, box[1][1] - box[1][0], shape[1]
    raise ValueError(f"a {len(shape)}-D tensor split beyond its first dimension is not supported")


def _tiles(shape, boxes: List[Box]) -> bool:
    """Whether the distinct boxes cover the tensor exactly, without overlap."""
    total = int(np.prod(shape, dtype=np.int64))
    if sum(int(np.prod([b - a for a, b in box], dtype=np.int64)) for box in boxes) != total:
        return False
    for i, p in enumerate(boxes):
        for q in boxes[i + 1:]:
            if all(max(a0, a1) < min(b0, b1) for (a0, b0), (a1, b1) in zip(p, q)):
                return False
    return True


@dataclass
class _Group:
    """Who holds what, across the group: gathered once per layout."""

    mine: list  # per segment: (name, shape, box)
    holders: dict  # name -> {box: lowest rank holding it}
    shapes: dict  # name -> shape
    row: dict  # split tensor name -> row of the reduced arrays
    owned: List[int]  # segments whose block this rank contributes
    held: List[int]  # segments of split tensors

    def reduce(self, local: np.ndarray, group, op=dist.ReduceOp.SUM, rows=None) -> np.ndarray:
        """[K, ...] values of the split tensors from the per-segment array `local` ([S, ...]):
        summed over the distinct blocks (rows None: the owned segments), or the maximum."""
        rows = self.owned if rows is None else rows
        total = torch.zeros((len(self.row), *local.shape[1:]), dtype=torch.float64)
        if op == dist.ReduceOp.MAX:
            total.fill_(-np.inf)
        for j in rows:
            r = self.row[self.mine[j][0]]
            v = torch.from_numpy(np.asarray(local[j], dtype=np.float64))
            total[r] = total[r] + v if op == dist.ReduceOp.SUM else torch.maximum(total[r], v)
        dist.all_reduce(total, op=op, group=group)
        return total.numpy()

    def put(self, target, values) -> None:
        for j in self.held:
            target[j] = values[self.row[self.mine[j][0]]]


def _gather(flat, group) -> _Group:
    key = ("shard_group", id(group))
    if key in flat._launch:
        return flat._launch[key]
    if len(flat.shards) != len(flat.segments):
        raise ValueError("one shard per segment")
    rank = dist.get_rank(group)
    mine = [(s.name, tuple(sh.shape), tuple(map(tuple, sh.box))) for s, sh in zip(flat.segments, flat.shards)]
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    holders: dict = {}
    shapes: dict = {}
    for r, held in enumerate(everyone):
        for name, shape, box in held:
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"tensor {name} has shape {shapes[name]} on one rank and {shape} on another")
            holders.setdefault(name, {}).setdefault(box, r)
    split = sorted(n for n, boxes in holders.items()
                   if len(boxes) > 1 or not Shard(shapes[n], next(iter(boxes))).whole)
    for name in split:
        if not _tiles(shapes[name], list(holders[name])):
            raise ValueError(f"the tensor-parallel blocks of {name} do not tile its shape {shapes[name]}")
    row = {name: i for i, name in enumerate(split)}
    owned = [j for j, (name, _, box) in enumerate(mine) if name in row and holders[name][box] == rank]
    held = [j for j, (name, _, _) in enumerate(mine) if name in row]
    flat._launch[key] = _Group(mine, holders, shapes, row, owned, held)
    return flat._launch[key]


def shard_stats(flat, shards: Sequence[Shard], group=None, *, della: bool = False,
                slerp: bool = False) -> SourceStats:
    """SourceStats of flat's segments (segment j holds shards[j] of the tensor named
    segments[j].name) as their whole tensors give them; every rank of `group` calls it."""
    flat.shards = list(shards)
    g = _gather(flat, group)
    st = compute_stats(flat, della=False, slerp=slerp)
    M = flat.n_models
    if g.row:
        g.put(st.max_source, g.reduce(st.max_source, group, dist.ReduceOp.MAX, g.held))
        if st.max_base is not None:
            g.put(st.max_base, g.reduce(st.max_base, group, dist.ReduceOp.MAX, g.held))
            g.put(st.max_delta, g.reduce(st.max_delta, group, dist.ReduceOp.MAX, g.held))
        if st.dots is not None:
            g.put(st.dots, g.reduce(st.dots, group))
            for j in g.held:
                st.norms[j] = np.sqrt(np.maximum(np.diag(st.dots[j]), 0.0))
        if st.delta_dots is not None:
            g.put(st.delta_dots, g.reduce(st.delta_dots, group))
        if st.hist is not None:
            for name in g.row:  # one tensor at a time: [M, 32768] counts
                counts = torch.zeros((M, R.KEY_MAX + 1), dtype=torch.int64)
                for j in g.owned:
                    if g.mine[j][0] == name:
                        counts += torch.stack([h.counts() for h in st.hist[j]])
                dist.all_reduce(counts, group=group)
                hists = [MagnitudeHistogram.from_counts(counts[m], flat.dtype) for m in range(M)]
                for j in g.held:
                    if g.mine[j][0] == name:
                        st.hist[j] = hists
                        st.l1[j] = [h.l1 for h in hists]
    if della:
        st.rank_codes = _rank_codes(flat, shards, g.mine, g.holders, g.shapes, group)
    return st


def with_masked_l1(flat, table, *, backend: str = "auto", block: Optional[int] = None):
    """The table with DARE / DELLA's masked L1 norms measured over the whole tensors: each
    rank sums its blocks, and the sums are added across the group (every rank calls it, once
    per candidate). The sums are exact where the L1 guard holds (cpu_backend._l1_sum_is_exact),
    so they equal the whole tensor's."""
    import dataclasses

    g = _gather(flat, flat.group)
    kept = table.l1_kept.copy()
    need = table.sparsified & np.isnan(kept)
    if flat.streamed:
        from .streaming import _measured_l1, staging

        local = _measured_l1(flat, staging(flat, flat.stream_device), table, backend, block)
    elif backend == "triton" or (backend == "auto" and flat.device.type == "cuda"):
        from . import triton_merge as T

        local = T.l1_kept(flat, table, block=block)
    else:
        from . import cpu_backend as cpu

        local = cpu.l1_kept(flat, table, skip_unused=True)
    local = np.where(need, np.nan_to_num(local), kept)
    if g.row:
        g.put(local, g.reduce(local, flat.group))
    return dataclasses.replace(table, l1_kept=np.where(need, local, kept))


def _rank_codes(flat, shards, mine, holders, shapes, group) -> torch.Tensor:
    """DELLA's rank codes, ranked within the whole tensor's rows (see the module docstring)."""
    if flat.base is None:
        raise ValueError("della rank codes need a base")
    codes = torch.zeros(flat.models.shape, dtype=torch.uint8, device=flat.models.device,
                        pin_memory=flat.models.is_pinned())
    partial = sorted(n for n, boxes in holders.items()
                     if not all(Shard(shapes[n], b).whole or Shard(shapes[n], b).whole_rows for b in boxes))
    for j, (seg, sh) in enumerate(zip(flat.segments, shards)):
        if seg.name not in partial:
            _fill_rank_codes(flat, seg, codes)
    for name in partial:  # every rank, in the same order
        keys = {}
        for j, (seg, sh) in enumerate(zip(flat.segments, shards)):
            if seg.name == name and tuple(map(tuple, sh.box)) not in keys:
                keys[tuple(map(tuple, sh.box))] = _keys(flat, seg).numpy()
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, keys, group=group)
        shape = shapes[name]
        whole = torch.zeros((flat.n_models, *shape), dtype=torch.int32)
        for blocks in everyone:
            for box, k in blocks.items():
                whole[(slice(None), *(slice(a, b) for a, b in box))] = torch.from_numpy(k).view(
                    flat.n_models, *[b - a for a, b in box])
        row_len = R.default_row_len(shape)
        ranked = torch.stack([R.della_rank_codes(whole[m].reshape(-1), row_len) for m in range(flat.n_models)])
        ranked = ranked.view(flat.n_models, *shape)
        for seg, sh in zip(flat.segments, shards):
            if seg.name == name:
                block = ranked[(slice(None), *(slice(a, b) for a, b in sh.box))].reshape(flat.n_models, -1)
                codes[:, seg.offset: seg.offset + seg.numel] = block.to(codes.device)
    return codes


def _keys(flat, seg) -> torch.Tensor:
    """[M, numel] magnitude keys of one segment's deltas (on the CPU)."""
    a, b = seg.offset, seg.offset + seg.numel
    work = flat.stream_device or flat.models.device
    base = flat.base[a:b].to(work).float()
    return torch.stack([R.magnitude_keys((flat.models[m, a:b].to(work).float() - base).to(flat.dtype)).cpu()
                        for m in range(flat.n_models)])


def whole_shape(flat, j: int) -> tuple:
    """The shape of segment j's whole tensor (its shard's tensor under tensor parallelism; a
    segment of unknown shape is one 1-D tensor)."""
    if flat.shards is not None:
        return tuple(flat.shards[j].shape)
    return flat.segments[j].shape or (flat.segments[j].numel,)


def summed_per_tensor(flat, local, shape) -> dict:
    """{j: local(j) summed over the distinct blocks of segment j's tensor} for every segment;
    local(j) is a float64 array of `shape` (a tuple, or shape(j), the same for every block of
    a tensor). Without shards, or for a tensor this rank holds whole, it is local(j). Every
    rank of flat.group calls it, and holds a block of every split tensor."""
    if flat.shards is None:
        return {j: np.asarray(local(j), dtype=np.float64) for j in range(len(flat.segments))}
    g = _gather(flat, flat.group)
    out = {j: np.asarray(local(j), dtype=np.float64) for j, (name, _, _) in enumerate(g.mine) if name not in g.row}
    for name in g.row:  # one tensor at a time, in the same order on every rank
        held = [j for j in g.held if g.mine[j][0] == name]
        if not held:
            raise ValueError(f"this rank holds no block of {name}")
        total = torch.zeros(shape(held[0]) if callable(shape) else shape, dtype=torch.float64)
        for j in g.owned:
            if g.mine[j][0] == name:
                total += torch.as_tensor(np.asarray(local(j), dtype=np.float64))
        dist.all_reduce(total, group=flat.group)
        for j in held:
            out[j] = total.numpy().copy()
    return out


def whole_tensor_values(flat, rows, compute) -> dict:
    """{j: compute(j, values)} for every segment j, with values [len(rows(j)), numel] the
    source rows rows(j) (model indices; -1: the base) of j's whole tensor, flattened in
    row-major order. A split tensor's blocks are gathered across flat.group, and compute
    runs once per tensor; rows(j) must be the same for every block of a tensor. Every rank
    of flat.group calls it."""
    work = flat.stream_device or flat.models.device  # where the statistics are computed

    def local(j):
        seg = flat.segments[j]
        a, b = seg.offset, seg.offset + seg.numel
        return torch.stack([(flat.base if r < 0 else flat.models[r])[a:b].to(work) for r in rows(j)])

    if flat.shards is None:
        return {j: compute(j, local(j)) for j in range(len(flat.segments))}
    g = _gather(flat, flat.group)
    out = {j: compute(j, local(j)) for j, (name, _, _) in enumerate(g.mine) if name not in g.row}
    for name in g.row:  # one tensor at a time, in the same order on every rank
        held = [j for j in g.held if g.mine[j][0] == name]
        blocks = {}
        for j in held:
            blocks.setdefault(g.mine[j][2], local(j).cpu().view(torch.uint8).numpy())
        everyone: list = [None] * dist.get_world_size(flat.group)
        dist.all_gather_object(everyone, blocks, group=flat.group)
        if not held:
            continue
        shape, n = g.shapes[name], len(rows(held[0]))
        whole = torch.zeros((n, *shape), dtype=flat.dtype)
        for theirs in everyone:
            for box, v in theirs.items():
                whole[(slice(None), *(slice(a, b) for a, b in box))] = torch.from_numpy(v).view(flat.dtype).reshape(
                    n, *[b - a for a, b in box])
        value = compute(held[0], whole.reshape(n, -1).to(work))
        for j in held:
            out[j] = value
    return out
