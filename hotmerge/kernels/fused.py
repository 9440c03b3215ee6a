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
by operation, so results agree bit for bit.

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
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import reference as R
from .stats import SourceStats, compute_stats

CHUNK = 1 << 20  # elements per torch step (bounds float32 scratch)


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
    st = flat.ensure_stats(della=spec.sparse_mode == R.SPARSE_RANKED, slerp=method == "slerp")
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


def _l1_kept_torch(flat: FlatSources, table: CoefficientTable) -> np.ndarray:
    kept = table.l1_kept.copy()
    need = table.sparsified & np.isnan(kept)
    for j, m in zip(*np.nonzero(need)):
        seg, total = flat.segments[j], 0.0
        for lo, hi in _chunks(seg.numel):
            a, b = seg.offset + lo, seg.offset + hi
            delta = (flat.models[m, a:b].float() - flat.base[a:b].float()).to(flat.dtype)
            elem = R.element_indices(seg.elem_offset + lo, seg.elem_offset + hi, flat.device)
            keep = _keep_torch(flat, table, j, m, delta, a, b, elem)
            total += float(torch.where(keep, delta.double().abs(), 0.0).sum())
        kept[j, m] = total
    return kept


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

    kept = _l1_kept_torch(flat, table) if table.needs_l1_pass else None
    scale = table.scales(kept)
    bad = []
    for j in unproven_segments(flat, table, scale):
        for lo, hi in _chunks(flat.segments[j].numel):
            if not torch.isfinite(merge_chunk_torch(flat, table, scale, j, lo, hi)).all():
                bad.append(j)
                break
    if bad:
        raise NonFiniteMergeError(bad, [flat.segments[j].name for j in bad])
    for j, seg in enumerate(flat.segments):
        for lo, hi in _chunks(seg.numel):
            _out_slice(out, flat, j, lo, hi).copy_(merge_chunk_torch(flat, table, scale, j, lo, hi))
