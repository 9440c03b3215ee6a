"""Candidate-application engine: write one merge into live weights in one pass.

Layout (built once):
  FlatSources.models  [M, total]  the M source models' weights X_i, flat, bf16/fp16
  FlatSources.base    [total]     the base model (None for linear/slerp-only use)
  FlatSources.segments            Segment(offset, numel, tensor_key, row_len, ...)
  FlatSources.stats               stats.SourceStats (histograms, norms, ...)

The sources are stored, not the deltas: delta = X - B is recomputed in the kernel
(one subtract and one rounding per element, free in a memory-bound pass) and
rounded to the source dtype exactly as mergekit computes it, so the task-arithmetic
family sees mergekit's very deltas, while linear and slerp, which mergekit computes
from the sources, stay exact too: storing bf16 deltas instead would make them
B + round(X - B) != X. Measured on 2^20 N(0,1) bf16 weights, 3 sources, linear with
weights (0.3, 0.5, 0.7): deltas of 0.02 / 0.2 / 1.0 x the weights' scale put 0.7% /
6.7% / 25% of the outputs off (mostly by 1 ulp), versus bit-exact from the sources.
The memory cost is the same: M 16-bit buffers.

Per candidate, `build_table` turns per-segment, per-model parameters into a
CoefficientTable (weights, |delta| key ranges from the histograms, integer keep
thresholds for the random masks, rescale norms, slerp coefficients), and `apply`
writes the merged values into a flat output or into one live tensor per segment.

Usage:
    flat = FlatSources.from_tensors([model_a_tensors, model_b_tensors], base_tensors, names)
    flat.compute_stats(della=False, slerp=False)      # once; build_table adds what it needs
    table = build_table("ties", flat, {"weight": w, "density": d}, normalize=True)
    apply(flat, table, out)      # out: flat [total] tensor, or one live tensor per segment

Backends: vectorised torch per segment chunk (CPU, also the production CPU path),
or Triton (CUDA; one launch for all segments, plus one reduction launch when a
random mask needs its L1 rescale). Both follow reference.merge_tensor operation
by operation, so results agree bit for bit. merge_chunk_torch is the torch
definition; on CPU, segments proven finite go through a restructured fast path
(_merge_segment_fast: cache-sized steps split evenly over torch's threads, scratch
reuse, integer masks, consensus without bool tensors) that computes the same bits;
see the comment above _GRAIN for why each change cannot alter a result. For random
masks with rescale, segments are measured and written one at a time, the masked
deltas kept in between, when no candidate outcome can be non-finite (_stream_ok).
Within the fast path, bf16 segments go through the compiled C kernel (cpu_native),
one pass per element block with the same float32 operations, when a C compiler is
there to build it: linear and slerp, and delta sums with TIES' consensus, magnitude
ranges and DARE's random masks (and DARE's masked L1 sums); DELLA stays in torch.

Non-finite results: a merged value can only be non-finite if a source is, or if the
coefficients make it overflow. `apply` first bounds every segment's output from
load-time maxima (max |B|, max |delta|, max |X|) and the table; a segment whose
bound is a finite bf16/fp16 value cannot produce inf/NaN and is written directly.
Only segments whose bound fails are merged once more in a dry run that writes
nothing and tests isfinite; any non-finite value raises NonFiniteMergeError
before a single output element is written. So the common case costs no extra
pass, and the output is untouched whenever the call raises.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import cpu_native as native
from . import reference as R
from .stats import SourceStats, compute_stats

CHUNK = 1 << 20  # elements per merge_chunk_torch step (bounds float32 scratch)


class NonFiniteMergeError(ValueError):
    """A candidate would write inf/NaN; `segments` lists the offending indices."""

    def __init__(self, segments: Sequence[int], names: Sequence[str]):
        self.segments = list(segments)
        self.names = list(names)
        shown = ", ".join(f"{i} ({n})" if n else str(i) for i, n in zip(self.segments, self.names))
        super().__init__(f"merge produces non-finite values in segment(s) {shown}; output untouched")


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
    param_row: int = -1  # row of the parameter arrays this segment uses; -1: its own index
    name: str = ""


class FlatSources:
    """The resident inputs of every merge: sources, base and segment table.

    models: [M, total] contiguous bf16/fp16, the source models' weights (not deltas);
    base: [total] or None (linear / slerp only); model_keys: random-stream key of
    each source (default 0..M-1). After changing the buffers in place, set
    `stats = None` so the next build_table recomputes the statistics.
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
            if s.elem_offset + s.numel > 1 << 32:
                raise ValueError(f"segment {s.name!r}: random streams index < 2^32 elements")
        self.models = models
        self.base = base
        self.segments = list(segments)
        self.model_keys = list(range(models.shape[0])) if model_keys is None else list(model_keys)
        if len(self.model_keys) != models.shape[0]:
            raise ValueError("one model key per source")
        self.stats: Optional[SourceStats] = None
        self._stats_flags = (False, False)
        self._stream_keys: dict = {}
        self._launch: dict = {}  # backend caches (block maps, device tables)

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
        """Pack per-model lists of tensors (same shapes across models) into one layout.

        Segment j is tensor j; its tensor_key is tensor_key_of(names[j]). Segment
        offsets and the total are padded to multiples of `align` elements (zeros),
        which lets the GPU kernel use aligned vector loads."""
        ref = models[0]
        names = list(names) if names is not None else [str(j) for j in range(len(ref))]
        dtype = dtype or ref[0].dtype
        device = device if device is not None else ref[0].device
        segments, offset = [], 0
        for j, t in enumerate(ref):
            segments.append(Segment(
                offset=offset, numel=t.numel(), tensor_key=tensor_key_of(names[j]),
                row_len=R.default_row_len(t.shape), name=names[j],
            ))
            offset += -(-t.numel() // align) * align
        total = offset

        def pack(tensors):
            if len(tensors) != len(ref) or any(a.shape != b.shape for a, b in zip(tensors, ref)):
                raise ValueError("every model must have the same tensors and shapes")
            buf = torch.zeros(total, dtype=dtype, device=device)
            for s, t in zip(segments, tensors):
                buf[s.offset: s.offset + s.numel] = t.reshape(-1).to(device=device, dtype=dtype)
            return buf

        flat_models = torch.stack([pack(ts) for ts in models]).contiguous()
        flat_base = pack(base) if base is not None else None
        return cls(flat_models, segments, flat_base, model_keys)

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
        """Load-time statistics (see stats.py); kept in self.stats."""
        self.stats = compute_stats(self, della=della, slerp=slerp)
        self._stats_flags = (della, slerp)
        return self.stats

    def ensure_stats(self, *, della: bool = False, slerp: bool = False) -> SourceStats:
        have_della, have_slerp = self._stats_flags
        if self.stats is None or (della and not have_della) or (slerp and not have_slerp):
            self.compute_stats(della=della or have_della, slerp=slerp or have_slerp)
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


# ---------------------------------------------------------------------------
# Coefficient table


@dataclass
class CoefficientTable:
    """Everything one candidate needs per (segment, model); small host arrays."""

    method: str
    spec: R.MethodSpec
    normalize: bool
    rescale: bool
    lambda_: float
    seed: int
    coef: np.ndarray  # [S, M] f32: combine coefficients (linear weights, slerp s0/s1)
    weight: np.ndarray  # [S, M] f32: task-arithmetic weights, rounded like mergekit
    div: np.ndarray  # [S] f32: linear / non-consensus divisor (1 when unused)
    lo: np.ndarray  # [S, M] int: magnitude masks keep keys in (lo, hi) ...
    hi: np.ndarray
    p0: np.ndarray  # [S, M] int: ... and keys == lo (hi) iff u24 < p0 (p1);
    p1: np.ndarray  # random masks keep iff u24 < p0 + p1 * rank_code
    keys: np.ndarray  # [S, M, 2] uint32 random-stream keys (k1, mult)
    sparsified: np.ndarray  # [S, M] bool: a mask applies (rescale may apply)
    l1: np.ndarray  # [S, M] f64 ||delta||_1
    l1_kept: np.ndarray  # [S, M] f64 ||masked||_1; NaN: measured by apply (random masks)
    rank_codes: Optional[torch.Tensor] = None

    @property
    def needs_l1_pass(self) -> bool:
        return bool(self.rescale and np.isnan(self.l1_kept[self.sparsified]).any())

    def scales(self, l1_kept: Optional[np.ndarray] = None) -> np.ndarray:
        """[S, M] f32 per-model factor w * rescale applied to each kept delta."""
        if self.spec.combine:
            return self.coef
        kept = self.l1_kept if l1_kept is None else l1_kept
        r = np.ones_like(self.l1)
        if self.rescale:
            with np.errstate(divide="ignore", invalid="ignore"):
                ok = self.sparsified & (self.l1 >= R.RESCALE_EPS) & (kept >= R.RESCALE_EPS)
                r = np.where(ok, self.l1 / np.where(ok, kept, 1.0), 1.0)
        return (self.weight.astype(np.float32) * r.astype(np.float32)).astype(np.float32)


def slerp_from_genes(genes) -> tuple:
    """mergekit-evolve's slerp decoding of per-model genes [n_rows, M]:
    the top-2 genes pick (base, other); t = softmax(top2)[1]. Returns (pair, t)."""
    g = torch.as_tensor(np.asarray(genes, dtype=np.float64))
    chosen = torch.topk(g, 2, dim=-1)
    t = torch.softmax(chosen.values, dim=-1)[..., 1]
    return chosen.indices.numpy(), t.numpy()


def _expand(value, rows: np.ndarray, S: int, M: int, name: str) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64)
    if a.ndim == 0:
        out = np.full((S, M), float(a))
    elif a.ndim == 1:
        if len(a) != M:
            raise ValueError(f"{name}: {len(a)} values for {M} models")
        out = np.broadcast_to(a, (S, M)).copy()
    elif a.ndim == 2:
        if a.shape[1] != M or (len(rows) and rows.max() >= a.shape[0]):
            raise ValueError(f"{name}: shape {a.shape} does not cover rows x {M} models")
        out = a[rows]
    else:
        raise ValueError(f"{name}: expected a scalar, [M] or [rows, M] values")
    if not np.isfinite(out).all():
        raise ValueError(f"{name}: non-finite parameter values")
    return out


def _param_dict(spec: R.MethodSpec, params) -> dict:
    if isinstance(params, Mapping):
        return dict(params)
    a = np.asarray(params, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError("params: a dict or an [rows, M, P] array")
    if spec.name == "slerp":
        return {"genes": a[:, :, 0]}
    if a.shape[2] > len(spec.params):
        raise ValueError(f"{spec.name} takes at most {len(spec.params)} params per model")
    return {name: a[:, :, i] for i, name in enumerate(spec.params[: a.shape[2]])}


def build_table(
    method: str,
    flat: FlatSources,
    params,
    *,
    normalize: bool,
    rescale: Optional[bool] = None,
    lambda_: float = 1.0,
    seed: int = 0,
) -> CoefficientTable:
    """Turn one candidate's parameters into a CoefficientTable.

    params: either a dict of per-model values, each a scalar, [M] or [rows, M]
    (row r applies to segments whose param_row is r), named "weight", "density",
    "gamma", "epsilon" as the method takes them; slerp takes "t" ([rows] or scalar)
    and "pair" ([rows, 2] or [2]: indices of slerp's base and other model), or
    "genes" ([rows, M], decoded as mergekit-evolve does); or an [rows, M, P]
    array in the method's genotype order (reference.METHODS[m].params; slerp: genes).
    rescale: None uses mergekit's default for the method.
    """
    spec = R.get_method(method)
    S, M = len(flat.segments), flat.n_models
    rows = flat.param_rows()
    p = _param_dict(spec, params)
    dtype = flat.dtype
    st = flat.ensure_stats(della=spec.needs_rank_codes, slerp=spec.needs_slerp_constants)
    if rescale is None:
        rescale = spec.default_rescale
    f32 = np.float32

    coef = np.zeros((S, M), dtype=f32)
    weight = np.zeros((S, M), dtype=f32)
    div = np.ones(S, dtype=f32)
    lo = np.zeros((S, M), dtype=np.int64)
    hi = np.full((S, M), R.KEY_MAX, dtype=np.int64)
    p0 = np.full((S, M), R.U24, dtype=np.int64)
    p1 = np.zeros((S, M), dtype=np.int64)
    sparsified = np.zeros((S, M), dtype=bool)
    l1 = np.zeros((S, M)) if st.l1 is None else st.l1.copy()
    l1_kept = l1.copy()
    keys = np.zeros((S, M, 2), dtype=np.uint32)

    if method == "slerp":
        if "genes" in p:
            pair, t = slerp_from_genes(p["genes"])
            pair, t = pair[rows], t[rows]
        else:
            t = np.broadcast_to(np.asarray(p["t"], dtype=np.float64), (S,)) if np.ndim(p["t"]) == 0 \
                else np.asarray(p["t"], dtype=np.float64)[rows]
            pair = np.asarray(p.get("pair", (0, 1)), dtype=np.int64)
            pair = np.broadcast_to(pair, (S, 2)) if pair.ndim == 1 else pair[rows]
        for j in range(S):
            i0, i1 = int(pair[j][0]), int(pair[j][1])
            if i0 == i1 or not (0 <= i0 < M and 0 <= i1 < M):
                raise ValueError(f"slerp pair {(i0, i1)} is not two distinct models")
            s0, s1 = R.slerp_coefficients(float(t[j]), st.norms[j, i0], st.norms[j, i1], st.dots[j, i0, i1])
            coef[j, i0], coef[j, i1] = s0, s1
    elif method == "linear":
        w = _expand(p["weight"], rows, S, M, "weight")
        coef[:] = w.astype(f32)
        if normalize:
            # the same float32 reduction as reference.linear_tensor (and mergekit)
            div[:] = [float(torch.tensor(w[j], dtype=torch.float32).sum()) for j in range(S)]
    else:
        if flat.base is None:
            raise ValueError(f"{method} needs a base model")
        w = _expand(p["weight"], rows, S, M, "weight")
        weight[:] = torch.tensor(w).to(dtype).double().numpy()  # mergekit's weight tensor dtype
        density = _expand(p.get("density", 1.0), rows, S, M, "density")
        gamma = _expand(p.get("gamma", R.DEFAULT_GAMMA), rows, S, M, "gamma")
        epsilon = _expand(p.get("epsilon", R.DEFAULT_EPSILON), rows, S, M, "epsilon")
        if not spec.consensus:
            for j in range(S):
                acc = f32(0.0)
                for m in range(M):
                    acc = f32(acc + weight[j, m])
                div[j] = acc if abs(float(acc)) >= R.LINEAR_DIV_EPS else f32(1.0)
        mode = spec.sparse_mode
        if mode != R.SPARSE_NONE:
            keys = flat.stream_keys(seed)
        for j, seg in enumerate(flat.segments):
            for m in range(M):
                d = float(density[j, m])
                if mode == R.SPARSE_NONE or d >= 1 or seg.numel == 0:
                    continue
                if mode == R.SPARSE_RANGE:
                    cut = R.KEEP_NONE  # density <= 0: nothing, no rescale (mergekit: zeros)
                    if d > 0:
                        h = st.hist[j][m]
                        cut = h.cut(spec.sparsify, d, float(gamma[j, m]))
                        sparsified[j, m] = True
                        l1_kept[j, m] = h.l1_kept(cut, dtype)
                    lo[j, m], hi[j, m], p0[j, m], p1[j, m] = cut.lo, cut.hi, cut.q_lo, cut.q_hi
                elif mode == R.SPARSE_RANDOM:
                    p0[j, m] = R.prob_threshold(R.round_param(d, dtype))
                    sparsified[j, m] = True
                    l1_kept[j, m] = np.nan
                else:
                    if d <= 0:
                        p0[j, m] = 0  # keep nothing; no rescale (mergekit: zeros)
                        continue
                    p0[j, m], p1[j, m] = R.della_thresholds(d, float(epsilon[j, m]))
                    sparsified[j, m] = True
                    l1_kept[j, m] = np.nan
    return CoefficientTable(
        method=method, spec=spec, normalize=bool(normalize), rescale=bool(rescale),
        lambda_=float(lambda_), seed=int(seed), coef=coef, weight=weight, div=div,
        lo=lo, hi=hi, p0=p0, p1=p1, keys=keys, sparsified=sparsified, l1=l1, l1_kept=l1_kept,
        rank_codes=st.rank_codes if spec.sparse_mode == R.SPARSE_RANKED else None,
    )


# ---------------------------------------------------------------------------
# Finite-output proof


def unproven_segments(flat: FlatSources, table: CoefficientTable, scale: np.ndarray) -> List[int]:
    """Segments whose output cannot be shown finite from load-time maxima."""
    st = flat.stats
    limit = 0.99 * torch.finfo(flat.dtype).max
    big = 1e37  # keep float32 intermediates far from overflow
    with np.errstate(all="ignore"):
        if table.spec.combine:
            inner = (np.abs(table.coef.astype(np.float64)) * st.max_source).sum(1)
            bound = inner / np.abs(table.div.astype(np.float64))
        else:
            a = np.abs(scale.astype(np.float64)) * st.max_delta
            a = np.where(scale == 0, 0.0, a)  # skipped models contribute nothing
            inner = a.sum(1)
            if not table.normalize:
                mixed = inner
            elif table.spec.consensus:
                w = table.weight.astype(np.float64)
                if (w >= 0).all():
                    # sum_S w r d / sum_S w is a weighted mean of r*d over selected models
                    r_d = np.where(w > 0, a / np.where(w > 0, w, 1.0), 0.0)
                    mixed = r_d.max(1)
                else:
                    mixed = inner / np.minimum(1.0, _min_subset_sum(w))
            else:
                mixed = inner / np.abs(table.div.astype(np.float64))
            bound = st.max_base + abs(table.lambda_) * mixed
        ok = np.isfinite(bound) & (bound * 1.001 <= limit) & np.isfinite(inner) & (inner <= big)
    return [j for j in range(len(flat.segments)) if not ok[j] and flat.segments[j].numel]


def _min_subset_sum(w: np.ndarray) -> np.ndarray:
    """Per row, min |sum over a nonempty subset| among the nonzero subset sums."""
    S, M = w.shape
    if M > 12:
        return np.zeros(S)  # too many subsets: prove nothing, dry-run instead
    best = np.full(S, np.inf)
    for r in range(1, M + 1):
        for sub in itertools.combinations(range(M), r):
            s = np.abs(w[:, list(sub)].sum(1))
            best = np.where(s > 0, np.minimum(best, s), best)
    return np.where(np.isfinite(best), best, 1.0)


# ---------------------------------------------------------------------------
# torch backend: loops over segments and chunks, vectorised within


def _f32(x) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32)


def _chunks(numel: int, chunk: int = CHUNK):
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


def _l1_kept_torch(flat: FlatSources, table: CoefficientTable, *, skip_unused: bool = False) -> np.ndarray:
    """table.l1_kept with the NaNs (random masks) measured: sum of |delta| over the kept.

    skip_unused: leave (segment, model) pairs with weight 0 unmeasured (NaN); their
    scale is 0 whatever the rescale, so apply does not need them."""
    kept = table.l1_kept.copy()
    need = table.sparsified & np.isnan(kept)
    if skip_unused:
        need &= table.weight != 0
    scr = _scratch(flat) if _fast_ok(flat) else None
    for j in np.nonzero(need.any(1))[0]:
        ms = [int(m) for m in np.nonzero(need[j])[0]]
        if scr is not None:
            exact = [m for m in ms if _l1_sum_is_exact(flat, j, m)]
            if exact:
                for m, v in zip(exact, _l1_kept_fast(flat, table, j, exact, scr)):
                    kept[j, m] = v
                ms = [m for m in ms if m not in exact]
        for m in ms:
            kept[j, m] = _l1_kept_reference(flat, table, j, m)
    return kept


def _l1_kept_reference(flat: FlatSources, table: CoefficientTable, j: int, m: int) -> float:
    seg, total = flat.segments[j], 0.0
    for lo, hi in _chunks(seg.numel):
        a, b = seg.offset + lo, seg.offset + hi
        delta = (flat.models[m, a:b].float() - flat.base[a:b].float()).to(flat.dtype)
        elem = R.element_indices(seg.elem_offset + lo, seg.elem_offset + hi, flat.device)
        keep = _keep_torch(flat, table, j, m, delta, a, b, elem)
        total += float(torch.where(keep, delta.double().abs(), 0.0).sum())
    return total


def merge_chunk_torch(flat, table, scale, j, lo, hi) -> torch.Tensor:
    """Merged values of segment j, elements [lo, hi), in the source dtype."""
    seg = flat.segments[j]
    a, b = seg.offset + lo, seg.offset + hi
    n = hi - lo
    if table.spec.combine:
        acc = torch.zeros(n, dtype=torch.float32, device=flat.device)
        for m in range(flat.n_models):
            if table.coef[j, m] != 0:
                acc = acc + flat.models[m, a:b].float() * _f32(table.coef[j, m])
        return (acc / _f32(table.div[j])).to(flat.dtype)

    base = flat.base[a:b].float()
    elem = None
    if table.spec.sparse_mode != R.SPARSE_NONE:
        elem = R.element_indices(seg.elem_offset + lo, seg.elem_offset + hi, flat.device)
    terms = []
    for m in range(flat.n_models):
        if scale[j, m] == 0:
            continue  # contributes nothing (not even to the consensus divisor)
        delta = (flat.models[m, a:b].float() - base).to(flat.dtype)
        d = delta.float() * _f32(scale[j, m])
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
            divisor = divisor + torch.where(agree, _f32(w), 0.0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed, divisor = total, _f32(table.div[j])
    if table.normalize:
        mixed = mixed / divisor
    mixed = mixed * _f32(table.lambda_)
    return (base + mixed).to(flat.dtype)


# ---------------------------------------------------------------------------
# torch fast path (CPU): merge_chunk_torch's arithmetic, restructured for speed
#
# merge_chunk_torch defines the result; this path computes the same bits, on CPU, for
# segments proven finite by unproven_segments (so every active delta, term, sum and
# divisor is finite: no NaN or inf anywhere it looks). What differs is only how:
# * Columns are taken in steps of about _COLS elements per model, and each step is
#   laid out [P, rows, h] with P = torch's intra-op thread count: torch splits every
#   elementwise op into P equal ranges, so each thread works on the same columns from
#   op to op and they stay in its core's cache. Sources are first copied into that
#   scratch: a plain copy streams from memory much faster than arithmetic reading it.
# * Preallocated scratch, in-place ops, all active models in one op, no bool tensors
#   (comparisons and torch.where are slow on CPU): masks are 0/-1 integer words ANDed
#   into the delta's bits, so a dropped delta becomes +0 before it is scaled.
# * Sums. The reference sums start from zeros: 0 + d0 + d1 + ... Summing d0 + d1 + ...
#   gives the same bits except when every term is -0 (then -0 instead of +0), so a
#   final `+ 0.0` makes the two equal; it is skipped where a -0 sum cannot change the
#   output (_sum_fix_needed). For the same reason the sign of a zero term never
#   matters in a zero-started sum (x + -0 = x + +0 for x != 0, and +0 + -0 = +0),
#   which is why a masked delta may become -0 after scaling where torch.where gives +0.
# * TIES consensus: with s = +-1 the sign of the total (+1 for +0: a total of -0
#   only arises when every term is +-0, and then no term agrees either way),
#   agreeing terms are the positive values of s*d, so mixed = s * (sum of relu(s*d)),
#   exactly (rounding to nearest is symmetric), and the divisor sums the weights
#   times sign(relu(s*d)) in {0, 1}.
# Segments not proven finite, other devices and element indices >= 2^31 use
# merge_chunk_torch itself.

_GRAIN = 32768  # at::internal::GRAIN_SIZE: elementwise ops on fewer elements use one thread
_COLS = 1 << 17  # elements per model per step of the fast path
_TINY_SCALE = 2.0 ** -16  # |delta * s| >= 2^-149 for every nonzero bf16/fp16 delta if s >= this
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


def _scratch(flat: FlatSources) -> _Scratch:
    """This thread's scratch for `flat` (thread-local: concurrent applies stay apart)."""
    local = flat._launch.get("torch_scratch")
    if local is None:
        local = flat._launch.setdefault("torch_scratch", threading.local())
    scr = getattr(local, "scr", None)
    if scr is None:
        scr = local.scr = _Scratch(flat.device)
    return scr


def _fast_ok(flat: FlatSources) -> bool:
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


def _fast_segment_ok(seg: Segment) -> bool:
    return seg.elem_offset + seg.numel <= 1 << 31  # int32 element indices


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

    def u24(self, scr, lo, P, h) -> torch.Tensor:
        k = len(self.rows)
        E = scr.get("elem", torch.int32, P, 1, h)
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
            _load_rows(T, flat.stats.rank_codes, self.rows, a, b)
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


def _merge_segment_fast(flat: FlatSources, table: CoefficientTable, scale: np.ndarray, j: int,
                        out, scr: _Scratch, plan: Optional["_MaskPlan"] = None,
                        cache: Optional[torch.Tensor] = None) -> None:
    """Write segment j. cache: the masked deltas of plan.rows, stored by _l1_pass."""
    seg = flat.segments[j]
    spec = table.spec
    dev = flat.device
    f32 = torch.float32
    threads = torch.get_num_threads()
    if spec.combine:
        rows = [m for m in range(flat.n_models) if table.coef[j, m] != 0]
        coefs = [float(table.coef[j, m]) for m in rows]
        div = float(table.div[j])
        if rows and _native_ok(flat):
            native.combine([flat.models[m, seg.offset: seg.offset + seg.numel] for m in rows], coefs, True, div,
                           _out_slice(out, flat, j, 0, seg.numel))
            return
        ccol = _cols(coefs, f32, dev) if rows else None
        div_t = _f32(div)
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
            _out_slice(out, flat, j, lo, hi).view(P, h).copy_(A)
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
    if k and cache is None and _native_ok(flat):
        native_plan = _native_plan(table, plan, scale, j, div, fix)
        if native_plan is not None:
            span = slice(seg.offset, seg.offset + seg.numel)
            native.merge(native_plan, [flat.models[m, span] for m in rows], flat.base[span],
                         seg.elem_offset, _out_slice(out, flat, j, 0, seg.numel))
            return
    scol = _cols([float(scale[j, m]) for m in rows], f32, dev) if k else None
    lam = float(table.lambda_)
    lam_t = _f32(lam)
    if consensus:
        weights = [float(table.weight[j, m]) for m in rows]
        wcol = _cols(weights, f32, dev) if k else None
        w_pos = bool(k) and min(weights) > 0
    div_t = _f32(div)
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
        _out_slice(out, flat, j, lo, hi).view(P, h).copy_(A)


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
    masks = _native_masks(plan) if _native_ok(flat) and plan.rows else None
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
    deltas, step by step in the layout _merge_segment_fast reads them back."""
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


def _stream_ok(flat: FlatSources, table: CoefficientTable) -> bool:
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


def _apply_streamed(flat: FlatSources, table: CoefficientTable, out, scr: _Scratch) -> None:
    """Random masks with rescale: per segment, the L1 pass (caching the masked deltas)
    and then the merge. Only when _stream_ok (nothing can raise)."""
    kept = table.l1_kept.copy()
    need = table.sparsified & np.isnan(kept) & (table.weight != 0)
    for j, seg in enumerate(flat.segments):
        ms = [int(m) for m in np.nonzero(need[j])[0]]
        cache = plan = None
        if ms and _fast_segment_ok(seg):
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
                        else _l1_kept_reference(flat, table, j, m)
            else:
                exact = [m for m in ms if _l1_sum_is_exact(flat, j, m)]
                for m, v in zip(exact, _l1_kept_fast(flat, table, j, exact, scr) if exact else []):
                    kept[j, m] = v
                for m in ms:
                    if m not in exact:
                        kept[j, m] = _l1_kept_reference(flat, table, j, m)
        else:
            for m in ms:
                kept[j, m] = _l1_kept_reference(flat, table, j, m)
        scale = table.scales(kept)
        if not _fast_segment_ok(seg):
            for lo, hi in _chunks(seg.numel):
                _out_slice(out, flat, j, lo, hi).copy_(merge_chunk_torch(flat, table, scale, j, lo, hi))
            continue
        if cache is not None:
            merge_plan = _MaskPlan(flat, table, j, [m for m in range(flat.n_models) if scale[j, m] != 0])
            if merge_plan.rows != plan.rows:
                cache = plan = None  # cannot happen (scale != 0 <=> weight != 0); be safe
        _merge_segment_fast(flat, table, scale, j, out, scr, plan=plan if cache is not None else None,
                            cache=cache)
    scr.bufs.pop("delta_cache", None)
    scr.views.clear()


def _out_slice(out, flat, j, lo, hi) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        o = flat.segments[j].offset
        return out[o + lo: o + hi]
    return out[j].view(-1)[lo:hi]


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


# ---------------------------------------------------------------------------
# apply


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
    """
    _check_out(flat, out)
    if backend == "auto":
        backend = "triton" if flat.device.type == "cuda" else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}")
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

    fast = _fast_ok(flat)
    if fast and table.needs_l1_pass and _stream_ok(flat, table):
        _apply_streamed(flat, table, out, _scratch(flat))
        return
    kept = _l1_kept_torch(flat, table, skip_unused=True) if table.needs_l1_pass else None
    scale = table.scales(kept)
    bad = []
    unproven = unproven_segments(flat, table, scale)
    for j in unproven:
        for lo, hi in _chunks(flat.segments[j].numel):
            if not torch.isfinite(merge_chunk_torch(flat, table, scale, j, lo, hi)).all():
                bad.append(j)
                break
    if bad:
        raise NonFiniteMergeError(bad, [flat.segments[j].name for j in bad])
    scr = _scratch(flat) if fast else None
    unproven = set(unproven)
    for j, seg in enumerate(flat.segments):
        if fast and j not in unproven and _fast_segment_ok(seg):
            _merge_segment_fast(flat, table, scale, j, out, scr)
            continue
        for lo, hi in _chunks(seg.numel):
            _out_slice(out, flat, j, lo, hi).copy_(merge_chunk_torch(flat, table, scale, j, lo, hi))
