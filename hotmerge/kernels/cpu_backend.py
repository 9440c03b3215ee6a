"""The CPU backend: merge_chunk_torch's arithmetic restructured for speed, and the C kernel.

Segments proven finite go through `merge_segment_fast` (cache-sized steps split
evenly over torch's threads, scratch reuse, integer masks, consensus without bool
tensors) that computes the same bits; see the comment above _GRAIN for why each
change cannot alter a result. For random masks with rescale, segments are measured
and written one at a time, the masked deltas kept in between, when no candidate
outcome can be non-finite (`stream_ok`). Within the fast path, bf16 segments go
through the compiled C kernel (cpu_native, cpu_merge.c), one pass per element block
with the same float32 operations, when a C compiler is there to build it: linear and
slerp, and delta sums with TIES' consensus, magnitude ranges and DARE's random masks
(and DARE's masked L1 sums); DELLA stays in torch.
"""

from __future__ import annotations

import threading
from typing import List, Optional

import numpy as np
import torch

from . import cpu_native as native
from . import reference as R
from .layout import FlatSources, Segment
from .table import CoefficientTable
from .finite import unproven_segments
from .torch_backend import (chunks, elementwise_chunk, l1_kept_reference, merge_chunk_torch, nearswap_chunk,
                            out_slice, scalar_f32)


def l1_kept(flat: FlatSources, table: CoefficientTable, *, skip_unused: bool = False) -> np.ndarray:
    """table.l1_kept with the NaNs (random masks) measured: sum of |delta| over the kept.

    skip_unused: leave (segment, model) pairs with weight 0 unmeasured (NaN); their
    scale is 0 whatever the rescale, so apply does not need them."""
    kept = table.l1_kept.copy()
    need = table.sparsified & np.isnan(kept)
    if skip_unused:
        need &= table.weight != 0
    scr = scratch(flat) if fast_ok(flat) else None
    for j in np.nonzero(need.any(1))[0]:
        ms = [int(m) for m in np.nonzero(need[j])[0]]
        if scr is not None:
            exact = [m for m in ms if _l1_sum_is_exact(flat, j, m)]
            if exact:
                for m, v in zip(exact, _l1_kept_fast(flat, table, j, exact, scr)):
                    kept[j, m] = v
                ms = [m for m in ms if m not in exact]
        for m in ms:
            kept[j, m] = l1_kept_reference(flat, table, j, m)
    return kept



_GRAIN = 32768  # at::internal::GRAIN_SIZE: elementwise ops on fewer elements use one thread


_GRAIN = 32768  # at::internal::GRAIN_SIZE: elementwise ops on fewer elements use one thread
_COLS = 1 << 17  # elements per model per step of the fast path


_COLS = 1 << 17  # elements per model per step of the fast path
_TINY_SCALE = 2.0 ** -16  # |delta * s| >= 2^-149 for every nonzero bf16/fp16 delta if s >= this


_TINY_SCALE = 2.0 ** -16  # |delta * s| >= 2^-149 for every nonzero bf16/fp16 delta if s >= this
_HASH_C1 = R._i32(0x7FEB352D)


_HASH_C1 = R._i32(0x7FEB352D)
_HASH_C2 = R._i32(0x846CA68B)



class _Scratch:
    """Reusable flat buffers, one per name, viewed in whatever shape a step needs."""

    def __init__(self, device):
        self.device = device
        self.bufs: dict = {}  # name -> byte buffer (a name may be viewed as several dtypes)
        self.views: dict = {}  # (name, dtype, shape) -> view
        self.consts: dict = {}

    def get(self, name: str, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        key = (name, dtype, shape)
        view = self.views.get(key)
        if view is not None:
            return view
        n = 1
        for d in shape:
            n *= d
        buf = self.bufs.get(name)
        if buf is None or buf.numel() * buf.element_size() < n * dtype.itemsize:
            buf = torch.empty(-(-n * dtype.itemsize // 8) * 8, dtype=torch.uint8, device=self.device)
            self.bufs[name] = buf
            self.views.clear()
        view = buf[: n * dtype.itemsize].view(dtype).view(shape)
        self.views[key] = view
        return view

    def rows(self, t: torch.Tensor) -> tuple:
        """The row views t[:, i] of a [P, k, h] scratch view (cached with it)."""
        key = ("rows", t.data_ptr(), t.dtype, tuple(t.shape))
        r = self.views.get(key)
        if r is None:
            r = self.views[key] = tuple(t[:, i] for i in range(t.shape[1]))
        return r

    def arange(self, n: int) -> torch.Tensor:
        a = self.consts.get("arange")
        if a is None or a.numel() < n:
            a = torch.arange(max(n, _COLS), dtype=torch.int32, device=self.device)
            self.consts["arange"] = a
        return a[:n]

    def one(self) -> torch.Tensor:
        if "one" not in self.consts:
            self.consts["one"] = torch.ones(1, dtype=torch.float32, device=self.device)
        return self.consts["one"]



def scratch(flat: FlatSources) -> _Scratch:
    """This thread's scratch for `flat` (thread-local: concurrent applies stay apart)."""
    local = flat._launch.get("torch_scratch")
    if local is None:
        local = flat._launch.setdefault("torch_scratch", threading.local())
    scr = getattr(local, "scr", None)
    if scr is None:
        scr = local.scr = _Scratch(flat.device)
    return scr



def fast_ok(flat: FlatSources) -> bool:
    return flat.device.type == "cpu"



def _native_ok(flat: FlatSources) -> bool:
    """Whether the compiled CPU kernel (cpu_native) can write this family's segments."""
    return flat.dtype == torch.bfloat16 and native.available()



def _native_masks(plan: "_MaskPlan") -> Optional["native.MergePlan"]:
    """The C kernel's description of plan's rows and masks; None where it does not apply."""
    rows = plan.rows
    mode = plan.mode if plan.active else None
    if len(rows) > native.MAX_ROWS or mode not in (None, R.SPARSE_RANGE, R.SPARSE_RANDOM):
        return None
    if mode == R.SPARSE_RANGE and len(plan.parts) > native.MAX_PARTS:
        return None
    p = native.MergePlan()
    p.k = len(rows)
    p.mask = {None: 0, R.SPARSE_RANGE: 1, R.SPARSE_RANDOM: 2}[mode]

    def ints(col: torch.Tensor) -> list:
        return col.view(-1).tolist()

    if mode == R.SPARSE_RANGE:
        p.need_lo, p.need_hi, p.n_parts = int(plan.need_lo), int(plan.need_hi), len(plan.parts)
        p.am1[:p.k], p.nb1[:p.k] = ints(plan.am1), ints(plan.nb1)
        for t, (keys, qs) in enumerate(plan.parts):
            p.part_key[t][:p.k], p.part_q[t][:p.k] = ints(keys), ints(qs)
    elif mode == R.SPARSE_RANDOM:
        p.p0[:p.k] = ints(plan.p0)
    if plan.need_hash:
        p.k1[:p.k], p.mult[:p.k] = ints(plan.k1), ints(plan.mult)
    return p



def _native_plan(table: CoefficientTable, plan: "_MaskPlan", scale: np.ndarray, j: int,
                 div: float, fix: bool) -> Optional["native.MergePlan"]:
    """The C kernel's description of segment j's merge; None where it does not apply."""
    p = _native_masks(plan)
    if p is None:
        return None
    weights = [float(table.weight[j, m]) for m in plan.rows]
    p.consensus = int(table.spec.consensus)
    p.normalize = int(bool(table.normalize))
    p.w_pos = int(min(weights) > 0)
    p.w_min = min(weights)
    p.fix, p.div, p.lam = int(fix), div, float(table.lambda_)
    for i, m in enumerate(plan.rows):
        p.scale[i] = float(scale[j, m])
        p.weight[i] = weights[i]
    return p



def fast_segment_ok(seg: Segment) -> bool:
    return seg.last_element() < 1 << 31  # int32 element indices



def _steps(numel: int, threads: int):
    """(lo, hi, P): column steps over a segment; P parts of equal length per step."""
    if threads <= 1:
        for lo in range(0, numel, _COLS):
            yield lo, min(numel, lo + _COLS), 1
        return
    step = threads * max(_GRAIN, _COLS // threads)
    lo = 0
    while lo < numel:
        n = min(numel - lo, step)
        if n >= threads * _GRAIN:
            n -= n % threads
            yield lo, lo + n, threads
        else:
            yield lo, lo + n, 1
        lo += n



def _cols(values, dtype, device) -> torch.Tensor:
    """Per-row constants as a [1, rows, 1] tensor (broadcast over [P, rows, h])."""
    return torch.tensor(list(values), dtype=dtype, device=device).view(1, -1, 1)



def _load_rows(dst: torch.Tensor, src: torch.Tensor, rows: List[int], a: int, b: int) -> None:
    """dst [P, k, h] <- rows of src [M, total] at columns [a, b) (converting dtype)."""
    P, k, h = dst.shape
    if rows == list(range(rows[0], rows[0] + k)):
        dst.copy_(src[rows[0]: rows[0] + k, a:b].view(k, P, h).transpose(0, 1))
    else:
        for i, m in enumerate(rows):
            dst[:, i].copy_(src[m, a:b].view(P, h))



def _sum_rows(rows: tuple, acc: torch.Tensor, fix: bool) -> None:
    """acc [P, h] <- rows[0] + rows[1] + ... in order (+ 0.0 when fix)."""
    if len(rows) == 1:
        if fix:
            torch.add(rows[0], 0.0, out=acc)
        else:
            acc.copy_(rows[0])
        return
    torch.add(rows[0], rows[1], out=acc)
    for r in rows[2:]:
        acc.add_(r)
    if fix:
        acc.add_(0.0)



def _sum_fix_needed(scales) -> bool:
    """Whether a non-consensus sum of terms needs the +0.0 that zero-starts it.

    Without it, the sum is -0 (instead of +0) only if every term is -0. With every
    scale >= _TINY_SCALE a term is -0 only if its delta is -0, i.e. X = -0 and B = +0
    (X - B = 0 exactly gives +0 otherwise); then the output is B + (+-0) = +0 either
    way. Dropped (masked) deltas are +0 and give +0 terms."""
    return not all(s >= _TINY_SCALE for s in scales)



def _u24_(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """X [P, r, h] <- lowbias32(X) >> 8, as R.random_u24 (in place; Y: scratch)."""
    torch.bitwise_right_shift(X, 16, out=Y)
    Y.bitwise_and_(0xFFFF)
    X.bitwise_xor_(Y)
    X.mul_(_HASH_C1)
    torch.bitwise_right_shift(X, 15, out=Y)
    Y.bitwise_and_(0x1FFFF)
    X.bitwise_xor_(Y)
    X.mul_(_HASH_C2)
    torch.bitwise_right_shift(X, 16, out=Y)
    Y.bitwise_and_(0xFFFF)
    X.bitwise_xor_(Y)
    X.bitwise_right_shift_(8)
    X.bitwise_and_(0xFFFFFF)
    return X



class _MaskPlan:
    """How the keep masks of a segment's active models are computed (batched over rows).

    range (ties, breadcrumbs): keep keys in [a, b], plus up to two partly kept cut
    keys (key == c and u24 < q); random (dare): u24 < p0; ranked (della):
    u24 < p0 + p1 * rank code. Rows that keep everything get no-op parameters."""

    def __init__(self, flat, table, j, rows):
        self.mode = table.spec.sparse_mode
        self.codes = table.rank_codes  # della's rank codes, arcee_fusion's keep bits
        self.rows = rows
        dev = flat.device
        seg = flat.segments[j]
        self.active = False
        self.need_hash = False
        self.lower_only = False
        self.parts = []
        keep_rows, masked = [], []
        if self.mode == R.SPARSE_RANGE:
            st = flat.stats
            am1, nb1, parts = [], [], []
            need_lo = need_hi = False
            for m in rows:
                lo, hi, q_lo, q_hi = (int(v[j, m]) for v in (table.lo, table.hi, table.p0, table.p1))
                keys = st.hist[j][m].keys
                a = lo if q_lo >= R.U24 else lo + 1
                b = hi if q_hi >= R.U24 else hi - 1
                part = {}
                for key, q in ((lo, q_lo), (hi, q_hi)):
                    if 0 < q < R.U24 and _has_key(keys, key):
                        part[key] = max(q, part.get(key, 0))
                if a > b:  # nothing kept for sure
                    a, b = R.KEY_MAX + 1, R.KEY_MAX
                kmin, kmax = (int(keys[0]), int(keys[-1])) if len(keys) else (0, -1)
                lower, upper = a > kmin, b < kmax
                if a > b and not part:
                    continue  # keeps nothing: the model's term is 0 (drop it)
                keep_rows.append(m)
                masked.append(lower or upper or bool(part))
                need_lo |= lower
                need_hi |= upper
                am1.append(a - 1 if lower else -1)
                nb1.append(-b - 1 if upper else -(R.KEY_MAX + 1))
                parts.append(sorted(part.items()))
            self.rows = keep_rows
            if any(masked):
                self.active = True
                self.need_lo, self.need_hi = need_lo, need_hi
                self.am1 = _cols(am1, torch.int16, dev)
                self.nb1 = _cols(nb1, torch.int16, dev)
                n_parts = max(len(p) for p in parts)
                self.parts = []
                for t in range(n_parts):
                    ks = [p[t][0] if t < len(p) else 0 for p in parts]
                    qs = [p[t][1] if t < len(p) else 0 for p in parts]
                    self.parts.append((_cols(ks, torch.int16, dev), _cols(qs, torch.int32, dev)))
                self.need_hash = n_parts > 0
                # TIES' usual cut: keys >= a kept, the bin just below a partly:
                # keep  <=>  key >= a - [u24 < q]  <=>  (a - 1) - key + hm < 0, hm in {0, -1}
                self.lower_only = (need_lo and not need_hi and n_parts == 1
                                   and all(not p or p[0][0] == c for p, c in zip(parts, am1)))
        elif self.mode in (R.SPARSE_RANDOM, R.SPARSE_RANKED):
            p0 = [int(table.p0[j, m]) for m in rows]
            p1 = [int(table.p1[j, m]) for m in rows]
            for m, a0, a1 in zip(rows, p0, p1):
                if a0 <= 0 and a1 <= 0:
                    continue  # keeps nothing
                keep_rows.append(m)
                masked.append(a0 < R.U24)
            self.rows = keep_rows
            if any(masked):
                self.active = self.need_hash = True
                sel = [rows.index(m) for m in keep_rows]
                self.p0 = _cols([p0[i] for i in sel], torch.int32, dev)
                self.ranked = self.mode == R.SPARSE_RANKED and any(p1[i] for i in sel)
                if self.ranked:
                    self.p1 = _cols([p1[i] for i in sel], torch.int32, dev)
        if self.need_hash:
            mu = [R._i32(int(table.keys[j, m, 1])) for m in self.rows]
            self.k1 = _cols([R._i32(int(table.keys[j, m, 0])) for m in self.rows], torch.int32, dev)
            self.mult = _cols(mu, torch.int32, dev)
            self.elem0 = seg.elem_offset
            self.seg = seg

    def u24(self, scr, lo, P, h) -> torch.Tensor:
        k = len(self.rows)
        E = scr.get("elem", torch.int32, P, 1, h)
        if self.seg.elem_cols:  # a column shard: rows of elem_cols, elem_stride apart
            E.copy_(self.seg.elements(lo, lo + P * h).view(P, 1, h))
        else:
            torch.add(scr.arange(P * h).view(P, 1, h), self.elem0 + lo, out=E)
        X = scr.get("hash", torch.int32, P, k, h)
        Y = scr.get("hash_tmp", torch.int32, P, k, h)
        torch.mul(E, self.mult, out=X)
        X.add_(self.k1)
        return _u24_(X, Y)

    def apply_range(self, scr, G: torch.Tensor, lo: int) -> None:
        """Zero the dropped deltas of G [P, k, h] (source dtype) in place."""
        P, k, h = G.shape
        G16 = G.view(torch.int16)
        K = scr.get("keys16", torch.int16, P, k, h)
        torch.bitwise_and(G16, R.KEY_MAX, out=K)
        keep = scr.get("keep16", torch.int16, P, k, h)
        T = scr.get("tmp16", torch.int16, P, k, h)
        if self.lower_only:
            hm = self.u24(scr, lo, P, h)
            hm.sub_(self.parts[0][1])  # u24 < q  <=>  u24 - q < 0
            hm.bitwise_right_shift_(31)
            H16 = scr.get("mask16", torch.int16, P, k, h)
            H16.copy_(hm)
            torch.sub(self.am1, K, out=keep)
            keep.add_(H16)
            keep.bitwise_right_shift_(15)
            G16.bitwise_and_(keep)
            return
        if self.need_lo:  # key >= a  <=>  a - 1 - key < 0
            torch.sub(self.am1, K, out=keep)
            keep.bitwise_right_shift_(15)
        if self.need_hi:  # key <= b  <=>  key - b - 1 < 0
            dst = T if self.need_lo else keep
            torch.add(K, self.nb1, out=dst)
            dst.bitwise_right_shift_(15)
            if self.need_lo:
                keep.bitwise_and_(T)
        if not (self.need_lo or self.need_hi):
            keep.zero_()  # only cut keys are kept (e.g. density picks one bin)
        if self.parts:
            u = self.u24(scr, lo, P, h)
            H32 = scr.get("hash_tmp", torch.int32, P, k, h)
            H16 = scr.get("mask16", torch.int16, P, k, h)
            for keycol, qcol in self.parts:
                torch.bitwise_xor(K, keycol, out=T)  # key == c  <=>  (key ^ c) - 1 < 0
                T.sub_(1)
                T.bitwise_right_shift_(15)
                torch.sub(u, qcol, out=H32)  # u24 < q  <=>  u24 - q < 0
                H32.bitwise_right_shift_(31)
                H16.copy_(H32)
                T.bitwise_and_(H16)
                keep.bitwise_or_(T)
        G16.bitwise_and_(keep)

    def random_mask(self, scr, flat, lo: int, a: int, b: int, P: int, h: int) -> torch.Tensor:
        """[P, k, h] int32, -1 where kept (random / ranked)."""
        X = self.u24(scr, lo, P, h)
        if self.ranked:
            k = len(self.rows)
            T = scr.get("thr32", torch.int32, P, k, h)
            _load_rows(T, self.codes, self.rows, a, b)
            T.mul_(self.p1)
            T.add_(self.p0)
            X.sub_(T)
        else:
            X.sub_(self.p0)
        X.bitwise_right_shift_(31)
        return X



def _has_key(keys: np.ndarray, key: int) -> bool:
    i = int(np.searchsorted(keys, key))
    return i < len(keys) and int(keys[i]) == key



def _deltas(flat, scr, plan: _MaskPlan, lo, hi, a, b, P, h):
    """(Gb, G): base [P, 1, h] and the masked deltas [P, k, h] in the source dtype."""
    dt = flat.dtype
    Gb = scr.get("base16", dt, P, 1, h)
    Gb.copy_(flat.base[a:b].view(P, 1, h))
    G = scr.get("src16", dt, P, len(plan.rows), h)
    _load_rows(G, flat.models, plan.rows, a, b)
    G.sub_(Gb)  # bf16(X - B): torch computes it in float32 and rounds, as the reference
    if plan.active and plan.mode == R.SPARSE_RANGE:
        plan.apply_range(scr, G, lo)
    return Gb, G



def _nearswap_segment(flat: FlatSources, table: CoefficientTable, scale: np.ndarray, j: int, out) -> None:
    """nearswap of segment j: the C kernel on bf16, else the torch chunks (the same bits)."""
    seg = flat.segments[j]
    m = int(np.flatnonzero(scale[j])[0]) if scale[j].any() else 0
    a, b = seg.offset, seg.offset + seg.numel
    if _native_ok(flat):
        native.nearswap(flat.models[m, a:b], flat.base[a:b], float(scale[j, m]), out_slice(out, flat, j, 0, seg.numel))
        return
    for lo, hi in chunks(seg.numel):
        out_slice(out, flat, j, lo, hi).copy_(
            nearswap_chunk(flat, table, scale, j, a + lo, a + hi, flat.base[a + lo: a + hi].float()))



def _elementwise_segment(flat: FlatSources, table: CoefficientTable, j: int, out) -> None:
    """sce, ram, ramplus_tl of segment j: the C kernel on bf16, else the torch chunks (the same bits)."""
    seg = flat.segments[j]
    rows = [int(m) for m in np.flatnonzero(table.coef[j])]
    a, b = seg.offset, seg.offset + seg.numel
    if _native_ok(flat) and len(rows) <= native.MAX_ROWS and not seg.elem_cols:
        sources = [flat.models[m, a:b] for m in rows]
        target = out_slice(out, flat, j, 0, seg.numel)
        weights = [float(table.weight[j, m]) for m in rows]
        if table.kind == "sce":
            k1, mult = (int(x) for x in table.keys[j, 0])
            cut = [int(table.lo[j, 0]), int(table.hi[j, 0]), int(table.p0[j, 0]), int(table.p1[j, 0])]
            native.sce(sources, flat.base[a:b], weights, cut, R._i32(k1), R._i32(mult), seg.elem_offset, target)
        else:
            native.ram(sources, flat.base[a:b], weights, int(table.lo[j, 0]), table.kind == "ramplus", target)
        return
    for lo, hi in chunks(seg.numel):
        out_slice(out, flat, j, lo, hi).copy_(elementwise_chunk(flat, table, j, lo, hi))



def merge_segment_fast(flat: FlatSources, table: CoefficientTable, scale: np.ndarray, j: int,
                        out, scr: _Scratch, plan: Optional["_MaskPlan"] = None,
                        cache: Optional[torch.Tensor] = None) -> None:
    """Write segment j. cache: the masked deltas of plan.rows, stored by _l1_pass."""
    seg = flat.segments[j]
    spec = table.spec
    dev = flat.device
    f32 = torch.float32
    threads = torch.get_num_threads()
    if table.kind == "nearswap":
        _nearswap_segment(flat, table, scale, j, out)
        return
    if table.kind in ("sce", "ram", "ramplus"):
        _elementwise_segment(flat, table, j, out)
        return
    if spec.engine == "fusion" and _native_ok(flat):
        rows = [m for m in range(flat.n_models) if scale[j, m] != 0]
        if len(rows) == 1 and scale[j, rows[0]] == 1.0:  # B + the kept delta of its one input
            span = slice(seg.offset, seg.offset + seg.numel)
            native.keep(flat.models[rows[0], span], flat.base[span], table.rank_codes[rows[0], span],
                        out_slice(out, flat, j, 0, seg.numel))
            return
    if table.combine:
        rows = [m for m in range(flat.n_models) if table.coef[j, m] != 0]
        coefs = [float(table.coef[j, m]) for m in rows]
        div = float(table.div[j])
        if rows and _native_ok(flat):
            native.combine([flat.models[m, seg.offset: seg.offset + seg.numel] for m in rows], coefs, True, div,
                           out_slice(out, flat, j, 0, seg.numel))
            return
        ccol = _cols(coefs, f32, dev) if rows else None
        div_t = scalar_f32(div)
        for lo, hi, P in _steps(seg.numel, threads):
            h = (hi - lo) // P
            a, b = seg.offset + lo, seg.offset + hi
            A = scr.get("acc", f32, P, h)
            if rows:
                F = scr.get("terms", f32, P, len(rows), h)
                _load_rows(F, flat.models, rows, a, b)
                F.mul_(ccol)
                _sum_rows(scr.rows(F), A, fix=True)  # no base to absorb a -0
            else:
                A.zero_()
            if div != 1.0:
                A.div_(div_t)
            out_slice(out, flat, j, lo, hi).view(P, h).copy_(A)
        return

    if plan is None:
        plan = _MaskPlan(flat, table, j, [m for m in range(flat.n_models) if scale[j, m] != 0])
    rows = plan.rows
    k = len(rows)
    consensus = spec.consensus
    if consensus:
        div, fix = 1.0, False
    else:
        div = float(table.div[j]) if table.normalize else 1.0
        fix = _sum_fix_needed([float(scale[j, m]) for m in rows])
    if k and cache is None and _native_ok(flat) and not (seg.elem_cols and plan.need_hash):
        native_plan = _native_plan(table, plan, scale, j, div, fix)
        if native_plan is not None:
            span = slice(seg.offset, seg.offset + seg.numel)
            native.merge(native_plan, [flat.models[m, span] for m in rows], flat.base[span],
                         seg.elem_offset, out_slice(out, flat, j, 0, seg.numel))
            return
    scol = _cols([float(scale[j, m]) for m in rows], f32, dev) if k else None
    lam = float(table.lambda_)
    lam_t = scalar_f32(lam)
    if consensus:
        weights = [float(table.weight[j, m]) for m in rows]
        wcol = _cols(weights, f32, dev) if k else None
        w_pos = bool(k) and min(weights) > 0
    div_t = scalar_f32(div)
    for lo, hi, P in _steps(seg.numel, threads):
        h = (hi - lo) // P
        a, b = seg.offset + lo, seg.offset + hi
        A = scr.get("acc", f32, P, h)
        if k:
            F = scr.get("terms", f32, P, k, h)
            if cache is not None:
                Gb = scr.get("base16", flat.dtype, P, 1, h)
                Gb.copy_(flat.base[a:b].view(P, 1, h))
                F.copy_(cache[k * lo: k * hi].view(P, k, h))
            else:
                Gb, G = _deltas(flat, scr, plan, lo, hi, a, b, P, h)
                F.copy_(G)
                if plan.active and plan.mode != R.SPARSE_RANGE:
                    F.view(torch.int32).bitwise_and_(plan.random_mask(scr, flat, lo, a, b, P, h))
            F.mul_(scol)
            Fr = scr.rows(F)
            if consensus:
                _sum_rows(Fr, A, fix=False)  # total: only its sign is used
                sgn = scr.get("sign", f32, P, h)
                torch.copysign(scr.one(), A, out=sgn)
                F.mul_(sgn.view(P, 1, h))
                F.clamp_min_(0.0)  # agreeing terms, as |d|; the rest 0
                _sum_rows(Fr, A, fix=False)
                A.mul_(sgn)
                A.add_(0.0)  # mixed (zero-started)
                if table.normalize:
                    F.sign_()  # 1 where the model agrees, else 0
                    F.mul_(wcol)
                    D = scr.get("divisor", f32, P, h)
                    _sum_rows(Fr, D, fix=False)
                    if w_pos:
                        D.clamp_min_(min(weights))  # 0 only if nothing agrees (then mixed = 0)
                    else:
                        torch.sign(D, out=sgn)  # divisor == 0 -> 1
                        sgn.abs_()
                        sgn.neg_()
                        sgn.add_(1.0)
                        D.add_(sgn)
                    A.div_(D)
            else:
                _sum_rows(Fr, A, fix=fix)
                if div != 1.0:
                    A.div_(div_t)
            B = Fr[0]
        else:
            Gb = scr.get("base16", flat.dtype, P, 1, h)
            Gb.copy_(flat.base[a:b].view(P, 1, h))
            A.zero_()
            if div != 1.0:
                A.div_(div_t)
            B = scr.get("base32", f32, P, h)
        if lam != 1.0:
            A.mul_(lam_t)
        B.copy_(Gb.view(P, h))
        A.add_(B)
        out_slice(out, flat, j, lo, hi).view(P, h).copy_(A)



def _l1_sum_is_exact(flat: FlatSources, j: int, m: int) -> bool:
    """Whether every float64 sum of |delta| over a subset of segment j, model m, in any
    order, is exact: all are multiples of the smallest nonzero |delta|'s quantum q and
    the full L1 is below 2^52 q. Then the masked L1 does not depend on how it is summed."""
    st = flat.stats
    if st is None or st.hist is None or not np.isfinite(st.max_delta[j, m]):
        return False
    keys = st.hist[j][m].keys
    keys = keys[keys > 0]
    if not len(keys):
        return True
    mant, bias = (7, 127) if flat.dtype == torch.bfloat16 else (10, 15)
    q = 2.0 ** (max(int(keys[0]) >> mant, 1) - bias - mant)
    return float(st.l1[j, m]) <= 2.0 ** 52 * q



def _l1_kept_fast(flat: FlatSources, table: CoefficientTable, j: int, ms: List[int],
                  scr: _Scratch) -> List[float]:
    """Masked L1 of models ms (random / ranked masks) in segment j, summed exactly."""
    plan = _MaskPlan(flat, table, j, ms)
    strided = flat.segments[j].elem_cols and plan.need_hash  # the C kernel indexes contiguously
    masks = _native_masks(plan) if _native_ok(flat) and plan.rows and not strided else None
    if masks is not None:
        seg = flat.segments[j]
        span = slice(seg.offset, seg.offset + seg.numel)
        sums = dict(zip(plan.rows, native.l1(masks, [flat.models[m, span] for m in plan.rows],
                                             flat.base[span], seg.elem_offset)))
    else:
        sums = _l1_pass(flat, j, plan, scr)
    return [sums.get(m, 0.0) for m in ms]  # models that keep nothing have L1 0



def _l1_pass(flat: FlatSources, j: int, plan: "_MaskPlan", scr: _Scratch,
             cache: Optional[torch.Tensor] = None) -> dict:
    """{model: sum of |kept delta|} over plan.rows of segment j, in float64 (exact only
    where _l1_sum_is_exact). cache: a [rows * numel] buffer that receives the masked
    deltas, step by step in the layout merge_segment_fast reads them back."""
    seg = flat.segments[j]
    rows = plan.rows
    if not rows:
        return {}
    k = len(rows)
    total = torch.zeros(k, dtype=torch.float64, device=flat.device)
    for lo, hi, P in _steps(seg.numel, torch.get_num_threads()):
        h = (hi - lo) // P
        a, b = seg.offset + lo, seg.offset + hi
        if cache is not None:
            G = cache[k * lo: k * hi].view(P, k, h)
            Gb = scr.get("base16", flat.dtype, P, 1, h)
            Gb.copy_(flat.base[a:b].view(P, 1, h))
            _load_rows(G, flat.models, rows, a, b)
            G.sub_(Gb)
        else:
            _, G = _deltas(flat, scr, plan, lo, hi, a, b, P, h)
        G16 = G.view(torch.int16)
        if plan.active:
            H16 = scr.get("mask16", torch.int16, P, k, h)
            H16.copy_(plan.random_mask(scr, flat, lo, a, b, P, h))
            G16.bitwise_and_(H16)
        K = scr.get("keys16", torch.int16, P, k, h)
        torch.bitwise_and(G16, R.KEY_MAX, out=K)  # |delta|, still in the source dtype
        F64 = scr.get("l1_64", torch.float64, P, k, h)
        F64.copy_(K.view(flat.dtype))
        total += F64.sum(dim=2).sum(dim=0)
    return dict(zip(rows, total.tolist()))



_CACHE_BYTES = 256 << 20  # masked deltas of one segment kept between the L1 and merge passes



def stream_ok(flat: FlatSources, table: CoefficientTable) -> bool:
    """Whether every segment is proven finite for any outcome of the masked L1 norms.

    The rescale is l1 / kept with kept >= max(RESCALE_EPS, smallest nonzero |delta|)
    whenever it applies (else 1), so |scale| <= |weight| * max(1, l1 / that). If that
    bound proves every segment, no candidate can raise, and segments may be measured
    and written one at a time (the masked deltas of a segment cached in between)."""
    st = flat.stats
    if st is None or st.hist is None:
        return False
    floor = st.extras.get("l1_kept_floor")
    if floor is None:  # smallest possible nonzero masked L1 per (segment, model)
        floor = np.full(table.l1.shape, R.RESCALE_EPS)
        for j in range(len(flat.segments)):
            for m in range(flat.n_models):
                keys = st.hist[j][m].keys
                keys = keys[keys > 0]
                if len(keys):
                    floor[j, m] = max(R.RESCALE_EPS, R.key_value(int(keys[0]), flat.dtype))
        st.extras["l1_kept_floor"] = floor
    with np.errstate(all="ignore"):
        r = np.maximum(1.0, table.l1 / floor)
        bound = np.abs(table.weight.astype(np.float64)) * r * (1 + 1e-5)
    if not np.isfinite(bound).all():
        return False
    return not unproven_segments(flat, table, bound)



def apply_streamed(flat: FlatSources, table: CoefficientTable, out, scr: _Scratch) -> None:
    """Random masks with rescale: per segment, the L1 pass (caching the masked deltas)
    and then the merge. Only when stream_ok (nothing can raise)."""
    kept = table.l1_kept.copy()
    need = table.sparsified & np.isnan(kept) & (table.weight != 0)
    for j, seg in enumerate(flat.segments):
        ms = [int(m) for m in np.nonzero(need[j])[0]]
        cache = plan = None
        if ms and fast_segment_ok(seg):
            rows = [m for m in range(flat.n_models) if table.weight[j, m] != 0]
            plan = _MaskPlan(flat, table, j, rows)
            nbytes = len(plan.rows) * seg.numel * flat.models.element_size()
            # The C kernel recomputes the masked deltas faster than a cache returns them.
            native_merges = _native_ok(flat) and _native_masks(plan) is not None
            if nbytes <= _CACHE_BYTES and not native_merges:
                cache = scr.get("delta_cache", flat.dtype, len(plan.rows) * seg.numel)
                sums = _l1_pass(flat, j, plan, scr, cache)
                for m in ms:
                    kept[j, m] = sums.get(m, 0.0) if _l1_sum_is_exact(flat, j, m) \
                        else l1_kept_reference(flat, table, j, m)
            else:
                exact = [m for m in ms if _l1_sum_is_exact(flat, j, m)]
                for m, v in zip(exact, _l1_kept_fast(flat, table, j, exact, scr) if exact else []):
                    kept[j, m] = v
                for m in ms:
                    if m not in exact:
                        kept[j, m] = l1_kept_reference(flat, table, j, m)
        else:
            for m in ms:
                kept[j, m] = l1_kept_reference(flat, table, j, m)
        scale = table.scales(kept)
        if not fast_segment_ok(seg):
            for lo, hi in chunks(seg.numel):
                out_slice(out, flat, j, lo, hi).copy_(merge_chunk_torch(flat, table, scale, j, lo, hi))
            continue
        if cache is not None:
            merge_plan = _MaskPlan(flat, table, j, [m for m in range(flat.n_models) if scale[j, m] != 0])
            if merge_plan.rows != plan.rows:
                cache = plan = None  # cannot happen (scale != 0 <=> weight != 0); be safe
        merge_segment_fast(flat, table, scale, j, out, scr, plan=plan if cache is not None else None,
                            cache=cache)
    scr.bufs.pop("delta_cache", None)
    scr.views.clear()
