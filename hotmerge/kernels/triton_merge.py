"""Triton kernels: one launch applies a candidate to every segment.

Grid: one program per BLOCK elements of a segment (blocks never straddle segments);
a block map built once per layout tells each program its segment and start. The
program reads base + M sources, recomputes mergekit's delta (X - B rounded to the
source dtype), applies the method's per-element logic (|delta| key range with a
random share of the cut bins, counter-based random keep, TIES sign consensus,
normalize divisor, or the linear/slerp weighted sum; sce, ram and ramplus_tl in branches
of their own) and writes the result either
into a flat buffer or, through a per-segment table of element offsets (each live
tensor's address relative to the first one's), straight into separate live tensors.
When every segment offset and size is a multiple of 8 elements (from_tensors pads
offsets to 16) and the pointers are 16-byte aligned, the kernel is told so
(tl.multiple_of) and can use 16-byte vector loads and stores.

Parity with the torch path (torch_backend.merge_chunk_torch) is bit-exact by construction:
same operation order, float32 ops without FMA contraction (enable_fp_fusion=False),
correctly rounded division (div_rn), integer keep tests, and rounding to bf16
done with integer ops (round to nearest even), because the CPU interpreter's
float->bf16 cast does not round to nearest even.

The consensus pass reads each source twice (sum of terms, then the agreeing terms):
the second read of a block just loaded is served from cache, and it keeps the
summation order identical to the torch path.

The masked L1 for DARE/DELLA's rescale is a separate reduction launch writing one
float64 partial per (block, model), summed per segment with index_add (no atomics,
so the result is deterministic).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from . import reference as R

BLOCK = 1024
NUM_WARPS = 4
_F32_MAX = tl.constexpr(3.4028234663852886e38)  # globals used in kernels must be constexpr


@triton.jit
def _mix32(x):
    # lowbias32 finalizer on uint32 (same as reference.lowbias32_)
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _round_src(x, IS_BF16: tl.constexpr):
    """float32 -> nearest source-dtype value (ties to even), kept as float32."""
    if IS_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        r = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits | 0x00400000) & 0xFFFF0000, r)
        return r.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float16).to(tl.float32)


@triton.jit
def _key(d, IS_BF16: tl.constexpr):
    """|d| as the 15-bit pattern of its source-dtype value (d already rounded)."""
    if IS_BF16:
        return ((d.to(tl.uint32, bitcast=True) >> 16) & 0x7FFF).to(tl.int32)
    else:
        return d.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF


@triton.jit
def _delta_keep(src_ptr, code_ptr, row, pos, inb, b, elem, ibase,
                SPARSE: tl.constexpr, IS_BF16: tl.constexpr):
    """(keep mask, rounded delta) of one model on this block. row = m * total."""
    x = tl.load(src_ptr + row + pos, mask=inb, other=0.0).to(tl.float32)
    d = _round_src(x - b, IS_BF16)
    if SPARSE == 0:
        keep = inb
    else:
        k1 = tl.load(ibase + 4).to(tl.uint32, bitcast=True)
        mult = tl.load(ibase + 5).to(tl.uint32, bitcast=True)
        u = (_mix32(elem * mult + k1) >> 8).to(tl.int32)
    if SPARSE == 1:
        # keys strictly inside (lo, hi); a random share of the two cut bins
        k = _key(d, IS_BF16)
        lo = tl.load(ibase + 0)
        hi = tl.load(ibase + 1)
        keep = ((k > lo) & (k < hi)) | ((k == lo) & (u < tl.load(ibase + 2))) \
            | ((k == hi) & (u < tl.load(ibase + 3)))
    elif SPARSE >= 2:
        thr = tl.load(ibase + 2)
        if SPARSE == 3:
            code = tl.load(code_ptr + row + pos, mask=inb, other=0).to(tl.int32)
            thr = thr + tl.load(ibase + 3) * code
        keep = u < thr
    return keep, d


@triton.jit
def _sce_value(src_ptr, fbase, ibase, pos, inb, b, elem, total64,
               M: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """SCE on this block (cpu_merge.c hm_sce_bf16): the float64 variance of the inputs'
    deltas picks the selected elements, whose sign election and weighted mean follow."""
    dsum = tl.zeros([BLOCK], dtype=tl.float64)
    n = tl.zeros([], dtype=tl.float64)
    for m in tl.static_range(M):
        if tl.load(fbase + 2 * m) != 0.0:
            x = tl.load(src_ptr + m * total64 + pos, mask=inb, other=0.0).to(tl.float32)
            dsum = dsum + _round_src(x - b, IS_BF16).to(tl.float64)
            n = n + 1.0
    mean = dsum / n
    dev = tl.zeros([BLOCK], dtype=tl.float64)
    for m in tl.static_range(M):
        if tl.load(fbase + 2 * m) != 0.0:
            x = tl.load(src_ptr + m * total64 + pos, mask=inb, other=0.0).to(tl.float32)
            c = _round_src(x - b, IS_BF16).to(tl.float64) - mean
            dev = dev + c * c
    k = _key(_round_src((dev / n).to(tl.float32), IS_BF16), IS_BF16)
    k1 = tl.load(ibase + 4).to(tl.uint32, bitcast=True)
    mult = tl.load(ibase + 5).to(tl.uint32, bitcast=True)
    u = (_mix32(elem * mult + k1) >> 8).to(tl.int32)
    lo = tl.load(ibase + 0)
    hi = tl.load(ibase + 1)
    keep = ((k > lo) & (k < hi)) | ((k == lo) & (u < tl.load(ibase + 2))) | ((k == hi) & (u < tl.load(ibase + 3)))
    tot = tl.zeros([BLOCK], dtype=tl.float32)
    for m in tl.static_range(M):
        if tl.load(fbase + 2 * m) != 0.0:
            x = tl.load(src_ptr + m * total64 + pos, mask=inb, other=0.0).to(tl.float32)
            tot = tot + tl.where(keep, _round_src(x - b, IS_BF16), 0.0)
    positive = tot >= 0
    mixed = tl.zeros([BLOCK], dtype=tl.float32)
    divisor = tl.zeros([BLOCK], dtype=tl.float32)
    for m in tl.static_range(M):
        if tl.load(fbase + 2 * m) != 0.0:
            w = tl.load(fbase + 2 * m + 1)
            x = tl.load(src_ptr + m * total64 + pos, mask=inb, other=0.0).to(tl.float32)
            d = tl.where(keep, _round_src(x - b, IS_BF16), 0.0)
            agree = tl.where(positive, d > 0, d < 0)
            mixed = mixed + tl.where(agree, d * w, 0.0)
            divisor = divisor + tl.where(agree, w, 0.0)
    return b + tl.math.div_rn(mixed, tl.maximum(divisor, 1e-6))


@triton.jit
def _ram_value(src_ptr, fbase, ibase, pos, inb, b, total64,
               M: tl.constexpr, PLUS: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """RAM / RAM+ on this block (cpu_merge.c hm_ram_bf16): each element counts the deltas
    whose key exceeds the threshold; one enters times its lambda, several as d / count each."""
    thr = tl.load(ibase + 0)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for m in tl.static_range(M):
        if tl.load(fbase + 2 * m) != 0.0:
            x = tl.load(src_ptr + m * total64 + pos, mask=inb, other=0.0).to(tl.float32)
            count = count + (_key(_round_src(x - b, IS_BF16), IS_BF16) > thr).to(tl.int32)
    c = tl.where(count > 1, count.to(tl.float32), 1.0)
    tot = tl.zeros([BLOCK], dtype=tl.float32)
    for m in tl.static_range(M):
        if tl.load(fbase + 2 * m) != 0.0:
            lam = tl.load(fbase + 2 * m + 1)
            x = tl.load(src_ptr + m * total64 + pos, mask=inb, other=0.0).to(tl.float32)
            d = _round_src(x - b, IS_BF16)
            nz = _key(d, IS_BF16) > thr
            shared = _round_src(tl.math.div_rn(d, c), IS_BF16)
            tot = tot + tl.where(nz & (count == 1), d * lam, tl.where(nz & (count > 1), shared, 0.0))
    if not PLUS:
        tot = _round_src(tot, IS_BF16)
    return b + tot


@triton.jit
def _element_index(seg_elem_ptr, seg, local):
    """Random-stream index (uint32) of elements `local` of segment seg: seg_elem holds
    (offset, cols, stride) per segment; cols > 0: rows of cols elements, stride apart."""
    e0 = tl.load(seg_elem_ptr + 3 * seg)
    cols = tl.load(seg_elem_ptr + 3 * seg + 1)
    if cols > 0:
        stride = tl.load(seg_elem_ptr + 3 * seg + 2)
        elem = e0 + (local // cols) * stride + local % cols
    else:
        elem = e0 + local
    return elem.to(tl.uint32)


@triton.jit
def _block_coords(blk_seg_ptr, blk_start_ptr, seg_off_ptr, seg_numel_ptr, total,
                  ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """(segment, index within segment, in-bounds mask, flat position, row stride)."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    off = tl.load(seg_off_ptr + seg)
    numel = tl.load(seg_numel_ptr + seg)
    total64 = tl.zeros([], dtype=tl.int64) + total
    if ALIGN > 1:
        # host-checked: offsets, sizes and row stride are multiples of ALIGN, so
        # loads and stores can be vectorised
        start = tl.multiple_of(start, BLOCK)
        off = tl.multiple_of(off, ALIGN)
        numel = tl.multiple_of(numel, ALIGN)
        total64 = tl.multiple_of(total64, ALIGN)
    local = start + tl.arange(0, BLOCK).to(tl.int64)
    return seg, local, local < numel, off + local, total64


@triton.jit
def _merge_kernel(
    base_ptr, src_ptr, code_ptr, out_ptr, addr_ptr, flag_ptr,
    blk_seg_ptr, blk_start_ptr, seg_off_ptr, seg_numel_ptr, seg_elem_ptr,
    ftab_ptr, itab_ptr, div_ptr, total, lam,
    M: tl.constexpr, COMBINE: tl.constexpr, SPARSE: tl.constexpr,
    CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, NEARSWAP: tl.constexpr, IS_BF16: tl.constexpr,
    OUT_MODE: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, OWN: tl.constexpr,
):
    # OWN: a method's own branch (OWN_KINDS); the per-model float entries are then
    # (1 for each input, weight or lambda)
    pid = tl.program_id(0)
    seg, local, inb, pos, total64 = _block_coords(
        blk_seg_ptr, blk_start_ptr, seg_off_ptr, seg_numel_ptr, total, ALIGN, BLOCK)
    fbase = ftab_ptr + seg * (2 * M)  # per model: (scale or coefficient, weight)
    ibase = itab_ptr + seg * (8 * M)  # per model: lo, hi, p0, p1, k1, mult, need_l1, -
    div = tl.load(div_ptr + seg)

    if COMBINE:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for m in tl.static_range(M):
            c = tl.load(fbase + 2 * m)
            if c != 0.0:
                x = tl.load(src_ptr + m * total64 + pos, mask=inb, other=0.0).to(tl.float32)
                acc = acc + x * c
        val = tl.math.div_rn(acc, tl.zeros([BLOCK], dtype=tl.float32) + div)
    elif OWN == 1:
        b = tl.load(base_ptr + pos, mask=inb, other=0.0).to(tl.float32)
        elem = _element_index(seg_elem_ptr, seg, local)
        val = _sce_value(src_ptr, fbase, ibase, pos, inb, b, elem, total64, M, IS_BF16, BLOCK)
    elif OWN >= 2:
        b = tl.load(base_ptr + pos, mask=inb, other=0.0).to(tl.float32)
        val = _ram_value(src_ptr, fbase, ibase, pos, inb, b, total64, M, OWN == 3, IS_BF16, BLOCK)
    else:
        b = tl.load(base_ptr + pos, mask=inb, other=0.0).to(tl.float32)
        elem = _element_index(seg_elem_ptr, seg, local)
        tot = tl.zeros([BLOCK], dtype=tl.float32)
        for m in tl.static_range(M):
            s = tl.load(fbase + 2 * m)
            if s != 0.0:
                keep, d = _delta_keep(src_ptr, code_ptr, m * total64, pos, inb, b, elem,
                                      ibase + 8 * m, SPARSE, IS_BF16)
                if NEARSWAP:
                    # s is t: weight clamp(t / max(|d|, 1e-6), 0, 1) per element
                    w = tl.math.div_rn(tl.zeros([BLOCK], dtype=tl.float32) + s, tl.maximum(tl.abs(d), 1e-6))
                    tot = tot + d * tl.minimum(tl.maximum(w, 0.0), 1.0)
                else:
                    tot = tot + tl.where(keep, d * s, 0.0)
        if CONSENSUS:
            positive = tot >= 0
            mixed = tl.zeros([BLOCK], dtype=tl.float32)
            dsum = tl.zeros([BLOCK], dtype=tl.float32)
            for m in tl.static_range(M):
                s = tl.load(fbase + 2 * m)
                w = tl.load(fbase + 2 * m + 1)
                if s != 0.0:
                    keep, d = _delta_keep(src_ptr, code_ptr, m * total64, pos, inb, b, elem,
                                          ibase + 8 * m, SPARSE, IS_BF16)
                    t = tl.where(keep, d * s, 0.0)
                    agree = tl.where(positive, t > 0, t < 0)
                    mixed = mixed + tl.where(agree, t, 0.0)
                    dsum = dsum + tl.where(agree, w, 0.0)
            dsum = tl.where(dsum == 0, 1.0, dsum)
        else:
            mixed = tot
            dsum = tl.zeros([BLOCK], dtype=tl.float32) + div
        if NORMALIZE:
            mixed = tl.math.div_rn(mixed, dsum)
        mixed = mixed * lam
        val = b + mixed

    res = _round_src(val, IS_BF16)
    if OUT_MODE == 0:
        tl.store(out_ptr + pos, res.to(out_ptr.dtype.element_ty), mask=inb)
    elif OUT_MODE == 1:
        # live tensors: element offset of segment seg's tensor from out_ptr
        rel = tl.load(addr_ptr + seg)
        if ALIGN > 1:
            rel = tl.multiple_of(rel, ALIGN)
        tl.store(out_ptr + rel + local, res.to(out_ptr.dtype.element_ty), mask=inb)
    else:
        bad = inb & ~(tl.abs(res) <= _F32_MAX)  # NaN compares false
        tl.store(flag_ptr + pid, tl.max(bad.to(tl.int32), axis=0))


@triton.jit
def _l1_kernel(
    base_ptr, src_ptr, code_ptr, part_ptr,
    blk_seg_ptr, blk_start_ptr, seg_off_ptr, seg_numel_ptr, seg_elem_ptr,
    itab_ptr, total,
    M: tl.constexpr, SPARSE: tl.constexpr, IS_BF16: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    seg, local, inb, pos, total64 = _block_coords(
        blk_seg_ptr, blk_start_ptr, seg_off_ptr, seg_numel_ptr, total, ALIGN, BLOCK)
    ibase = itab_ptr + seg * (8 * M)
    b = tl.load(base_ptr + pos, mask=inb, other=0.0).to(tl.float32)
    elem = _element_index(seg_elem_ptr, seg, local)
    for m in tl.static_range(M):
        part = tl.zeros([BLOCK], dtype=tl.float64)
        if tl.load(ibase + 8 * m + 6) != 0:
            keep, d = _delta_keep(src_ptr, code_ptr, m * total64, pos, inb, b, elem,
                                  ibase + 8 * m, SPARSE, IS_BF16)
            part = tl.where(keep & inb, tl.abs(d), 0.0).to(tl.float64)
        tl.store(part_ptr + pid * M + m, tl.sum(part, axis=0))


# ---------------------------------------------------------------------------
# host side


def _block_map(flat, block: int, segments: Optional[Sequence[int]] = None):
    """(blk_seg int32, blk_start int64) on flat's device; cached for all segments."""
    key = ("blocks", block) if segments is None else None
    if key is not None and key in flat._launch:
        return flat._launch[key]
    idx = range(len(flat.segments)) if segments is None else segments
    segs, starts = [], []
    for j in idx:
        nb = -(-flat.segments[j].numel // block)
        segs.append(np.full(nb, j, dtype=np.int32))
        starts.append(np.arange(nb, dtype=np.int64) * block)
    segs = np.concatenate(segs) if segs else np.zeros(0, np.int32)
    starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    res = (torch.from_numpy(segs).to(flat.device), torch.from_numpy(starts).to(flat.device))
    if key is not None:
        flat._launch[key] = res
    return res


def _segment_arrays(flat):
    """Per-segment offset and numel, and (element offset, cols, stride) (int64) on device; cached."""
    if "segs" not in flat._launch:
        a = np.array([[s.offset, s.numel] for s in flat.segments], dtype=np.int64).reshape(-1, 2)
        e = np.array([[s.elem_offset, s.elem_cols, s.elem_stride] for s in flat.segments], dtype=np.int64)
        a = torch.from_numpy(a.T.copy()).to(flat.device)
        flat._launch["segs"] = (a[0].contiguous(), a[1].contiguous(), torch.from_numpy(e.reshape(-1)).to(flat.device))
    return flat._launch["segs"]


def _int_table(flat, table) -> torch.Tensor:
    S, M = table.lo.shape
    it = np.zeros((S, M, 8), dtype=np.int64)
    it[..., 0], it[..., 1], it[..., 2], it[..., 3] = table.lo, table.hi, table.p0, table.p1
    it[..., 4:6] = table.keys.astype(np.int64)
    it[..., 4:6] = np.where(it[..., 4:6] >= 1 << 31, it[..., 4:6] - (1 << 32), it[..., 4:6])
    it[..., 6] = table.rescale & table.sparsified & np.isnan(table.l1_kept)
    return torch.from_numpy(it.astype(np.int32)).to(flat.device)


def _float_table(flat, table, scale) -> tuple:
    S, M = table.coef.shape
    ft = np.zeros((S, M, 2), dtype=np.float32)
    ft[..., 0] = table.coef if table.combine or table.kind in OWN_KINDS else scale
    ft[..., 1] = table.weight
    return (torch.from_numpy(ft).to(flat.device),
            torch.from_numpy(table.div.astype(np.float32)).to(flat.device))


# the table kinds with a branch of their own in _merge_kernel (its OWN)
OWN_KINDS = {"sce": 1, "ram": 2, "ramplus": 3}

VEC = 8  # elements per 16-byte vector of a 16-bit dtype


def _align(flat, block: int, ptrs=(), rel=None) -> int:
    """VEC when every offset, size, row stride and pointer allows 16-byte vectors, else 1."""
    if "align" not in flat._launch:
        ok = flat.total % VEC == 0 and all(
            s.offset % VEC == 0 and s.numel % VEC == 0 for s in flat.segments)
        ok = ok and flat.models.data_ptr() % 16 == 0
        ok = ok and (flat.base is None or flat.base.data_ptr() % 16 == 0)
        flat._launch["align"] = ok
    ok = flat._launch["align"] and block % VEC == 0 and all(p % 16 == 0 for p in ptrs)
    if rel is not None:
        ok = ok and all(r % VEC == 0 for r in rel)
    return VEC if ok else 1


def _launch_opts():
    # FMA contraction would change float32 rounding versus the torch path
    return {"enable_fp_fusion": False}


def _dummy(flat):
    if "dummy" not in flat._launch:
        flat._launch["dummy"] = torch.zeros(1, dtype=flat.dtype, device=flat.device)
    return flat._launch["dummy"]


def l1_sums(flat, table, *, block: Optional[int] = None) -> torch.Tensor:
    """[S, M] float64 masked L1 sums on flat's device (launched, not waited for): the pairs
    whose table.l1_kept is NaN, 0 elsewhere."""
    block = block or BLOCK
    blk_seg, blk_start = _block_map(flat, block)
    off, numel, elem = _segment_arrays(flat)
    M = flat.n_models
    parts = torch.zeros((blk_seg.numel(), M), dtype=torch.float64, device=flat.device)
    codes = table.rank_codes if table.rank_codes is not None else _dummy(flat)
    if blk_seg.numel():
        _l1_kernel[(blk_seg.numel(),)](
            flat.base, flat.models, codes, parts, blk_seg, blk_start, off, numel, elem,
            _int_table(flat, table), flat.total,
            M=M, SPARSE=table.spec.sparse_mode, IS_BF16=flat.dtype == torch.bfloat16,
            ALIGN=_align(flat, block), BLOCK=block, num_warps=NUM_WARPS, **_launch_opts(),
        )
    sums = torch.zeros((len(flat.segments), M), dtype=torch.float64, device=flat.device)
    sums.index_add_(0, blk_seg.long(), parts)
    return sums


def l1_kept(flat, table, *, block: Optional[int] = None) -> np.ndarray:
    """[S, M] float64 masked L1 norms (table.l1_kept with the NaNs measured)."""
    sums = l1_sums(flat, table, block=block)
    kept = table.l1_kept.copy()
    need = table.sparsified & np.isnan(kept)
    kept[need] = sums.cpu().numpy()[need]
    return kept


def _launch_merge(flat, table, scale, blk, out_mode, out=None, addr=None, flags=None,
                  block=BLOCK, align=1):
    blk_seg, blk_start = blk
    if not blk_seg.numel():
        return
    off, numel, elem = _segment_arrays(flat)
    ftab, div = _float_table(flat, table, scale)
    dummy = _dummy(flat)
    combine = table.combine
    _merge_kernel[(blk_seg.numel(),)](
        flat.base if flat.base is not None else dummy, flat.models,
        table.rank_codes if table.rank_codes is not None else dummy,
        out if out is not None else dummy,
        addr if addr is not None else off,
        flags if flags is not None else off,
        blk_seg, blk_start, off, numel, elem,
        ftab, _int_table(flat, table), div, flat.total, float(table.lambda_),
        M=flat.n_models, COMBINE=combine, SPARSE=0 if combine or table.kind in OWN_KINDS else table.spec.sparse_mode,
        CONSENSUS=table.spec.consensus, NORMALIZE=table.normalize, NEARSWAP=table.kind == "nearswap",
        IS_BF16=flat.dtype == torch.bfloat16, OUT_MODE=out_mode, ALIGN=align, BLOCK=block,
        OWN=OWN_KINDS.get(table.kind, 0), num_warps=NUM_WARPS, **_launch_opts(),
    )


def merge(flat, table, scale: np.ndarray, out, *, block: Optional[int] = None) -> None:
    """Write every segment: out is a flat tensor or one tensor per segment."""
    block = block or BLOCK
    blk = _block_map(flat, block)
    if isinstance(out, torch.Tensor):
        _launch_merge(flat, table, scale, blk, 0, out=out, block=block,
                      align=_align(flat, block, [out.data_ptr()]))
    elif len(out):
        # each live tensor as an element offset from the first one (same dtype, so
        # every data_ptr difference is a whole number of elements)
        size = out[0].element_size()
        rel = [(o.data_ptr() - out[0].data_ptr()) // size for o in out]
        addr = torch.tensor(rel, dtype=torch.int64).to(flat.device)
        _launch_merge(flat, table, scale, blk, 1, out=out[0], addr=addr, block=block,
                      align=_align(flat, block, [out[0].data_ptr()], rel))


def nonfinite_segments(flat, table, scale: np.ndarray, segments: Sequence[int],
                       *, block: Optional[int] = None) -> List[int]:
    """Dry run over `segments`: which would produce inf/NaN (nothing is written)."""
    block = block or BLOCK
    blk = _block_map(flat, block, segments)
    flags = torch.zeros(blk[0].numel(), dtype=torch.int32, device=flat.device)
    _launch_merge(flat, table, scale, blk, 2, flags=flags, block=block, align=_align(flat, block))
    bad = blk[0][flags != 0].unique().cpu().tolist()
    return sorted(int(j) for j in bad)
