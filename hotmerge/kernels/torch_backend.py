"""The torch backend: reference.merge_tensor's operations, segment by segment, in chunks.

`merge_chunk_torch` follows reference.merge_tensor operation by operation on any
device; the CPU fast path (cpu_backend) and the Triton kernels (triton_merge) must
give its bits. It is also the path for segments not proven finite, other devices,
and element indices >= 2^31.
"""

from __future__ import annotations

import numpy as np
import torch

from . import reference as R
from .layout import CHUNK, FlatSources
from .table import CoefficientTable


def scalar_f32(x) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32)



def chunks(numel: int, chunk: int = CHUNK):
    for lo in range(0, numel, chunk):
        yield lo, min(numel, lo + chunk)



def _keep_torch(flat, table, j, m, delta, a, b, elem):
    """Keep mask of model m's delta (source dtype) on flat range [a, b)."""
    mode = table.spec.sparse_mode
    if mode == R.SPARSE_NONE:
        return None
    k1, mult = (int(x) for x in table.keys[j, m])
    if mode == R.SPARSE_RANGE:
        lo, hi, q_lo, q_hi = (int(v[j, m]) for v in (table.lo, table.hi, table.p0, table.p1))
        k = R.magnitude_keys(delta)
        keep = (k > lo) & (k < hi)
        # random bits only where a cut bin is partly kept (few elements)
        partial = torch.zeros_like(keep)
        for key, q in ((lo, q_lo), (hi, q_hi)):
            if q >= R.U24:
                keep |= k == key
            elif q > 0:
                partial |= k == key
        if bool(partial.any()):
            at = partial.nonzero().reshape(-1)
            u = R.random_u24(elem[at], k1, mult)
            ka = k[at]
            keep[at] = ((ka == lo) & (u < q_lo)) | ((ka == hi) & (u < q_hi))
        return keep
    u = R.random_u24(elem, k1, mult)
    thr = int(table.p0[j, m])
    if mode == R.SPARSE_RANKED:
        return u < thr + int(table.p1[j, m]) * table.rank_codes[m, a:b].to(torch.int64)
    return u < thr



def l1_kept_reference(flat: FlatSources, table: CoefficientTable, j: int, m: int) -> float:
    seg, total = flat.segments[j], 0.0
    for lo, hi in chunks(seg.numel):
        a, b = seg.offset + lo, seg.offset + hi
        delta = (flat.models[m, a:b].float() - flat.base[a:b].float()).to(flat.dtype)
        elem = seg.elements(lo, hi, flat.device)
        keep = _keep_torch(flat, table, j, m, delta, a, b, elem)
        total += float(torch.where(keep, delta.double().abs(), 0.0).sum())
    return total



ROW_KINDS = ("rows", "rows_combine")  # per-row coefficients: this backend on every device


def merge_chunk_torch(flat, table, scale, j, lo, hi) -> torch.Tensor:
    """Merged values of segment j, elements [lo, hi), in the source dtype."""
    seg = flat.segments[j]
    a, b = seg.offset + lo, seg.offset + hi
    n = hi - lo
    if table.kind in ROW_KINDS:
        return rows_chunk(flat, table, j, lo, hi)
    if table.combine:
        acc = torch.zeros(n, dtype=torch.float32, device=flat.device)
        for m in range(flat.n_models):
            if table.coef[j, m] != 0:
                acc = acc + flat.models[m, a:b].float() * scalar_f32(table.coef[j, m])
        return (acc / scalar_f32(table.div[j])).to(flat.dtype)

    base = flat.base[a:b].float()
    if table.kind == "nearswap":
        return nearswap_chunk(flat, table, scale, j, a, b, base)
    if table.kind in ("sce", "ram", "ramplus"):
        return elementwise_chunk(flat, table, j, lo, hi)
    elem = None
    if table.spec.sparse_mode != R.SPARSE_NONE:
        elem = seg.elements(lo, hi, flat.device)
    terms = []
    for m in range(flat.n_models):
        if scale[j, m] == 0:
            continue  # contributes nothing (not even to the consensus divisor)
        delta = (flat.models[m, a:b].float() - base).to(flat.dtype)
        d = delta.float() * scalar_f32(scale[j, m])
        keep = _keep_torch(flat, table, j, m, delta, a, b, elem)
        terms.append((torch.where(keep, d, 0.0) if keep is not None else d, table.weight[j, m]))
    total = torch.zeros_like(base)
    for d, _ in terms:
        total = total + d
    if table.spec.consensus:
        positive = total >= 0
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for d, w in terms:
            agree = torch.where(positive, d > 0, d < 0)
            mixed = mixed + torch.where(agree, d, 0.0)
            divisor = divisor + torch.where(agree, scalar_f32(w), 0.0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed, divisor = total, scalar_f32(table.div[j])
    if table.normalize:
        mixed = mixed / divisor
    mixed = mixed * scalar_f32(table.lambda_)
    return (base + mixed).to(flat.dtype)



def nearswap_chunk(flat, table, scale, j, a, b, base) -> torch.Tensor:
    """reference.nearswap_tensor on flat range [a, b): t is the scale of the one model."""
    m = int(np.flatnonzero(scale[j])[0]) if scale[j].any() else 0
    d = (flat.models[m, a:b].float() - base).to(flat.dtype).float()
    w = torch.clamp(scalar_f32(scale[j, m]) / torch.clamp(d.abs(), min=1e-6), 0.0, 1.0)
    return (base + d * w).to(flat.dtype)



def elementwise_chunk(flat, table, j, lo, hi) -> torch.Tensor:
    """reference.sce_combine / ram_combine on segment j, elements [lo, hi) (source dtype)."""
    seg = flat.segments[j]
    a, b = seg.offset + lo, seg.offset + hi
    base = flat.base[a:b].float()
    idx = np.flatnonzero(table.coef[j])
    deltas = [(flat.models[m, a:b].float() - base).to(flat.dtype) for m in idx]
    weights = [float(table.weight[j, m]) for m in idx]
    if table.kind == "sce":
        keys = R.sce_var_keys(deltas)
        k1, mult = (int(x) for x in table.keys[j, 0])
        elem = seg.elements(lo, hi, flat.device)
        cut = R.RangeCut(int(table.lo[j, 0]), int(table.hi[j, 0]), int(table.p0[j, 0]), int(table.p1[j, 0]))
        keep = R.range_keep(keys, R.random_u24(elem, k1, mult), cut)
        return R.sce_combine(base, deltas, keep, weights).to(flat.dtype)
    return R.ram_combine(base, deltas, int(table.lo[j, 0]), weights, plus=table.kind == "ramplus").to(flat.dtype)



def rows_chunk(flat, table, j, lo, hi) -> torch.Tensor:
    """reference.stats_merge_rows on segment j, elements [lo, hi): each element takes the
    coefficients of its row, found from its index in the whole tensor (source dtype)."""
    seg = flat.segments[j]
    a, b = seg.offset + lo, seg.offset + hi
    coef, columns, shape, inputs = table.row_coef[j]
    coef = coef.to(flat.device)
    elem = seg.elements(lo, hi, flat.device)
    rows = R.row_ids(elem, shape, columns) if shape else torch.zeros(hi - lo, dtype=torch.int64, device=flat.device)
    base = flat.base[a:b].float() if table.kind == "rows" else None
    acc = torch.zeros(hi - lo, dtype=torch.float32, device=flat.device)
    for m in inputs:
        v = flat.models[m, a:b] if base is None else (flat.models[m, a:b].float() - base).to(flat.dtype)
        acc = acc + v.float() * coef[rows, m]
    return (acc if base is None else base + acc).to(flat.dtype)



def out_slice(out, flat, j, lo, hi) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        o = flat.segments[j].offset
        return out[o + lo: o + hi]
    return out[j].view(-1)[lo:hi]
