"""Every merge method under tensor parallelism: a gloo group of 2 (and 3) ranks merges its
shards, with whole-tensor statistics computed across the group (kernels/sharded.py) and
random draws keyed by the element's index in the whole tensor; the gathered result must
equal the whole-tensor merge bit for bit."""

import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hotmerge import kernels as F
from hotmerge.kernels import cpu_backend
from hotmerge.kernels import reference as R
from hotmerge.kernels.methods import METHODS
from hotmerge.kernels.sharded import Shard, element_layout

M = 3
# every method, and the per-row forms of model_stock and nuslerp ("method/variant")
CASES = sorted(METHODS) + ["model_stock/filter_wise", "nuslerp/rows", "nuslerp/columns"]
# (method, params, with a base) for mergekit's functional methods
FUNCTIONAL = {
    "model_stock": ({}, True),
    "nuslerp": ({"weight": [0.3, 0.8, 0.0], "active": [1, 1, 0]}, True),
    "multislerp": ({"weight": [0.3, 0.8, 0.5]}, True),
    "passthrough": ({"scale": [0.0, 0.7, 0.0], "active": [0, 1, 0]}, False),
    "nearswap": ({"t": [0.0, 0.03, 0.0], "active": [0, 1, 0]}, True),
    "karcher": ({"max_iter": 10, "tol": 1e-5}, False),
    # a cut inside the variance histogram: ties at its bins draw by element index
    "sce": ({"select_topk": [0.4, 0.4, 0.4]}, True),
    # epsilon near the deltas' scale: shared and unique elements both occur
    "ram": ({"epsilon": 0.03}, True),
    "ramplus_tl": ({"r": 0.3, "alpha": 0.7, "epsilon": 0.08}, True),  # rho below alpha
    "arcee_fusion": ({"active": [0, 1, 0]}, True),
    "model_stock/filter_wise": ({"filter_wise": 1.0}, True),
    "nuslerp/rows": ({"weight": [0.3, 0.8, 0.0], "active": [1, 1, 0], "nuslerp_flatten": 0.0}, True),
    "nuslerp/columns": ({"weight": [0.0, 0.3, 0.8], "active": [0, 1, 1], "nuslerp_flatten": 0.0,
                         "nuslerp_row_wise": 1.0}, False),
}


def tensors():
    """(name, shape, how it is split) of a family with every kind of split."""
    return [
        ("rows.weight", (12, 18), "rows"),  # column-parallel layers, vocabulary-parallel embeddings
        ("cols.weight", (18, 12), "cols"),  # row-parallel layers (o_proj, down_proj)
        ("odd_cols.weight", (7, 6), "cols"),
        ("bias", (36,), "rows"),  # a split 1-D tensor: one row, partial on every rank
        ("norm.weight", (24,), "whole"),  # replicated
        ("kv.weight", (8, 6), "replicated_rows"),  # blocks held by more than one rank (KV heads)
    ]


def boxes(shape, how, rank, world):
    if how == "whole":
        return tuple((0, s) for s in shape)
    if how == "replicated_rows":  # two blocks, the ranks split between them
        half = shape[0] // 2
        r = (0, half) if rank < (world + 1) // 2 else (half, shape[0])
        return (r,) + tuple((0, s) for s in shape[1:])
    dim = 0 if how == "rows" else 1
    step = shape[dim] // world
    lo, hi = rank * step, (rank + 1) * step if rank < world - 1 else shape[dim]
    return tuple((lo, hi) if d == dim else (0, s) for d, s in enumerate(shape))


def family(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(shape, generator=g).bfloat16() for _, shape, _ in tensors()]
    models = [[(b.float() + 0.05 * torch.randn(b.shape, generator=g)).bfloat16() for b in base] for _ in range(M)]
    return base, models


def layout(base, models, with_base, rank=None, world=None):
    """The whole family (rank None) or one rank's shards, one segment per tensor."""
    names = [name for name, _, _ in tensors()]
    if rank is None:
        flat = F.FlatSources.from_tensors(models, base if with_base else None, names)
    else:
        cut = [boxes(shape, how, rank, world) for _, shape, how in tensors()]

        def block(t, box):
            return t[tuple(slice(a, b) for a, b in box)].contiguous()

        flat = F.FlatSources.from_tensors([[block(t, bx) for t, bx in zip(ts, cut)] for ts in models],
                                          [block(t, bx) for t, bx in zip(base, cut)] if with_base else None, names)
        flat.shards = [Shard(shape, bx) for (_, shape, _), bx in zip(tensors(), cut)]
        for seg, shard in zip(flat.segments, flat.shards):  # as the vLLM worker sets them
            seg.elem_offset, seg.elem_cols, seg.elem_stride = element_layout(shard)
            seg.shape, seg.row_len = shard.shape, R.default_row_len(shard.shape)
    for j, s in enumerate(flat.segments):
        s.param_row = j % 2
    return flat


def candidate(method):
    if method in FUNCTIONAL:
        return FUNCTIONAL[method]
    rng = np.random.default_rng(1)
    if method == "slerp":
        return {"t": rng.uniform(0, 1, 2), "pair": np.array([[0, 2], [1, 0]])}, False
    return {"weight": rng.uniform(0.1, 1.0, (2, M)), "density": rng.uniform(0.3, 0.7, (2, M)),
            "gamma": rng.uniform(0.0, 0.1, (2, M)), "epsilon": np.full((2, M), 0.1)}, True


def merged(flat, method, params):
    """{tensor name: merged values} of a layout."""
    table = F.build_table(method, flat, params, normalize=True, lambda_=0.9, seed=5)
    outs = [torch.zeros(s.numel, dtype=flat.dtype) for s in flat.segments]
    F.apply(flat, table, outs)
    return outs


def _rank(rank, world, port, methods, fast, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if not fast:
        cpu_backend.fast_ok = lambda flat: False
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        base, models = family()
        mismatches = {}
        for case in methods:
            method = case.split("/")[0]
            params, with_base = candidate(case)
            flat = layout(base, models, with_base, rank, world)
            flat.group = dist.group.WORLD
            outs = merged(flat, method, params)
            mine = {s.name: (sh.box, o) for s, sh, o in zip(flat.segments, flat.shards, outs)}
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            if rank == 0:
                whole = merged(layout(base, models, with_base), method, params)
                bad = []
                for (name, shape, _), want in zip(tensors(), whole):
                    got = torch.full(shape, float("nan"), dtype=torch.bfloat16)
                    for held in gathered:
                        box, values = held[name]
                        got[tuple(slice(a, b) for a, b in box)] = values.view([b - a for a, b in box])
                    if not torch.equal(got.reshape(-1), want):
                        bad.append((name, int((got.reshape(-1) != want).sum())))
                mismatches[case] = bad
        if rank == 0:
            results.put(mismatches)
    finally:
        dist.destroy_process_group()


def run_group(world, methods, fast=True):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, methods, fast, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = results.get(timeout=900)
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    return out


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sharded_merge_equals_whole_tensor_merge(world):
    """Row, column and 1-D splits, replicated tensors and blocks held twice: each rank's merge
    is exactly its block of the whole-tensor merge, for every method allowed under tensor
    parallelism (CPU fast path and C kernel)."""
    mismatches = run_group(world, CASES)
    assert mismatches == {m: [] for m in CASES}


@pytest.mark.slow  # a second group of ranks
def test_sharded_merge_on_the_torch_path():
    methods = ["dare_ties", "della", "ties", "breadcrumbs", "slerp", "sce", "ramplus_tl", "arcee_fusion"]
    mismatches = run_group(2, methods, fast=False)
    assert mismatches == {m: [] for m in methods}


def test_element_layout_of_blocks():
    assert element_layout(Shard((12, 18), ((6, 12), (0, 18)))) == (108, 0, 0)
    assert element_layout(Shard((18, 12), ((0, 18), (6, 12)))) == (6, 6, 12)
    assert element_layout(Shard((36,), ((18, 36),))) == (18, 0, 0)
    seg = F.Segment(offset=0, numel=36, elem_offset=6, elem_cols=6, elem_stride=12)
    assert seg.elements(0, 8).tolist() == [6, 7, 8, 9, 10, 11, 18, 19]
    assert seg.last_element() == 5 * 12 + 11


def test_blocks_that_do_not_tile_are_refused():
    from hotmerge.kernels.sharded import _tiles

    assert _tiles((4, 4), [((0, 2), (0, 4)), ((2, 4), (0, 4))])
    assert not _tiles((4, 4), [((0, 3), (0, 4)), ((2, 4), (0, 4))])  # overlap and too many
    assert not _tiles((4, 4), [((0, 2), (0, 4))])  # a gap
