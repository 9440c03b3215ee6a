"""The coefficient table: one candidate's parameters, per (segment, model), ready for a kernel.

`build_table` turns per-segment, per-model parameters into a CoefficientTable:
weights rounded as mergekit rounds them, |delta| key ranges from the load-time
histograms, integer keep thresholds for the random masks, rescale norms, slerp
coefficients. It is a few small host arrays; every backend reads the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from . import reference as R
from . import sharded
from .layout import FlatSources


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
    rank_codes: Optional[torch.Tensor] = None  # [M, total] uint8: della's rank codes, arcee_fusion's keep bits
    # kinds "rows" and "rows_combine" (model_stock with filter_wise, nuslerp with
    # nuslerp_flatten false): per segment, (coefficients [R, M] float32 on the sources'
    # device, columns, the whole tensor's shape, the inputs): element e of a segment takes
    # row reference.row_ids(e) of its coefficients; `weight` (`coef`) holds each model's
    # largest |coefficient| for the finite check
    row_coef: Optional[list] = None
    # how the kernels apply it: "combine" (sum of coef * X), "task" (B + merged deltas),
    # "nearswap" (B + clamp(t / |delta|, 0, 1) * delta, t in `weight`), "sce" (coef: 1 for
    # each tensor's inputs; weight: sce's per-model weights; the variance keys kept in
    # (lo, hi) and those == lo (hi) iff u24 < p0 (p1), the stream of keys[:, 0]), "ram" and
    # "ramplus" (coef: the inputs; weight: lambda per model; a delta counts where its key
    # > lo), "rows" (B + per-row coefficients times the deltas) and "rows_combine" (the
    # same of the sources, without a base)
    kind: str = "task"

    @property
    def combine(self) -> bool:
        return self.kind == "combine"

    @property
    def needs_l1_pass(self) -> bool:
        return bool(self.rescale and np.isnan(self.l1_kept[self.sparsified]).any())

    def scales(self, l1_kept: Optional[np.ndarray] = None) -> np.ndarray:
        """[S, M] f32 per-model factor w * rescale applied to each kept delta."""
        if self.combine:
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
    if spec.engine != "task" and a.shape[2]:
        return {name: a[:, :, i] for i, name in enumerate(spec.genes[: a.shape[2]])}
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
    spec.refuse_unless_supported()
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

    kind = "combine" if spec.combine else "task"
    row_coef = None
    codes = st.rank_codes if spec.sparse_mode == R.SPARSE_RANKED else None
    if spec.engine in ("sce", "ram", "fusion"):
        kind, codes = _elementwise(spec, flat, p, rows, st, seed=seed, coef=coef, weight=weight,
                                   cut=(lo, hi, p0, p1), keys=keys)
        normalize, rescale, lambda_ = False, False, 1.0
    elif spec.functional:
        kind, row_coef = _functional(spec, flat, p, rows, st, coef, weight)
        normalize, rescale, lambda_ = False, False, 1.0
    elif method == "slerp":
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
        rank_codes=codes, kind=kind, row_coef=row_coef,
    )


def _karcher(flat: FlatSources, st, settings: tuple) -> dict:
    """karcher's coefficients per segment (settings[j]: its inputs, max_iter and tol), from
    its iteration on the whole tensors (reference.karcher_tensor_coefficients; a split
    tensor's blocks gathered across the tensor-parallel group): once per setting, never per
    apply. Kept with the statistics, so that sources changed in place (then flat.stats =
    None) recompute them."""
    key = ("karcher", settings)
    if key not in st.extras:
        st.extras[key] = sharded.whole_tensor_values(
            flat, lambda j: settings[j][0],
            lambda j, values: R.karcher_tensor_coefficients(list(values), settings[j][1], settings[j][2]))
    return st.extras[key]


def _per_row(spec: R.MethodSpec, values: dict, inputs: list) -> list:
    """Per segment: None (one set of coefficients per tensor), or whether mergekit's rows
    are columns (model_stock with filter_wise: rows; nuslerp with nuslerp_flatten false:
    columns where nuslerp_row_wise)."""
    def flag(name, j, idx, default):
        return bool(values[name][j, idx[0]]) if name in values else default

    if spec.name == "model_stock":
        return [False if flag("filter_wise", j, idx, False) else None for j, idx in enumerate(inputs)]
    if spec.name == "nuslerp":
        return [None if flag("nuslerp_flatten", j, idx, True) else flag("nuslerp_row_wise", j, idx, False)
                for j, idx in enumerate(inputs)]
    return [None] * len(inputs)


def _row_grams(flat: FlatSources, st, inputs: list, modes: list, with_base: bool) -> dict:
    """{j: [R, M, M] float64 Gram matrices of segment j's rows (reference.row_grams) over its
    inputs' deltas (sources without a base)} for the per-row segments, of the whole tensors
    (a split tensor's partial sums added across the tensor-parallel group): once, at the
    first table."""
    key = ("row_grams", tuple(tuple(int(i) for i in idx) for idx in inputs), tuple(modes), with_base)
    if key not in st.extras:
        M = flat.n_models
        chunk = 1 << 18

        def shape(j):
            rows = R.row_count(sharded.whole_shape(flat, j), bool(modes[j])) if modes[j] is not None else 0
            return (rows, M, M)

        def grams(j):
            seg, idx = flat.segments[j], [int(i) for i in inputs[j]]
            out = torch.zeros(shape(j), dtype=torch.float64)
            if modes[j] is None:
                return out
            pick = (torch.tensor(idx)[:, None], torch.tensor(idx)[None, :])
            for lo in range(0, seg.numel, chunk):
                a, b = seg.offset + lo, seg.offset + min(seg.numel, lo + chunk)
                v = flat.models[idx, a:b]
                if with_base:
                    v = (v.float() - flat.base[a:b].float()).to(flat.dtype)
                v = v.double()
                r = R.row_ids(seg.elements(lo, lo + (b - a)), sharded.whole_shape(flat, j), modes[j]).to(v.device)
                sub = torch.zeros((out.shape[0], len(idx), len(idx)), dtype=torch.float64, device=v.device)
                sub.index_add_(0, r, (v[:, None, :] * v[None, :, :]).permute(2, 0, 1))
                out[:, pick[0], pick[1]] += sub.cpu()
            return out

        st.extras[key] = sharded.summed_per_tensor(flat, grams, shape)
    return st.extras[key]


def _functional(spec: R.MethodSpec, flat: FlatSources, p: dict, rows: np.ndarray, st, coef: np.ndarray,
                weight: np.ndarray) -> tuple:
    """Fill coef (no base) or weight (with a base) for a "stats" method, or weight with
    nearswap's t; returns the table's kind and its per-row coefficients (or None).
    p["active"]: which models are this tensor's inputs (default all); shared parameters
    come as per-model values, read from the first active model."""
    S, M = coef.shape
    active = _expand(p.get("active", 1.0), rows, S, M, "active") != 0
    per_model = {q.name for q in spec.tensor_params}
    shared = {q.name: q.default for q in spec.global_params}
    values = {name: _expand(p[name], rows, S, M, name) for name in list(per_model) + list(shared) if name in p}
    with_base = spec.takes_base and flat.base is not None
    if spec.needs_base and not with_base:
        raise ValueError(f"{spec.name} needs a base model")
    lo, hi = spec.contract.non_base_range(with_base)
    grams = st.delta_dots if with_base else st.dots
    inputs = [np.flatnonzero(active[j]) for j in range(S)]
    for j, idx in enumerate(inputs):
        if len(idx) < lo or (hi is not None and len(idx) > hi):
            want = f"{lo}" if hi == lo else f"{lo} to {hi}" if hi is not None else f"at least {lo}"
            raise ValueError(f"{spec.name} merges {want} models besides the base per tensor, "
                             f"{flat.segments[j].name or j} has {len(idx)}")
    modes = _per_row(spec, values, inputs)
    if any(m is not None for m in modes):
        return _functional_rows(spec, flat, st, values, inputs, modes, with_base, coef, weight)
    if spec.name == "karcher":
        iterations = values.get("max_iter", np.full((S, M), 10.0))
        tolerance = values.get("tol", np.full((S, M), 1e-5))
        karcher = _karcher(flat, st, tuple((tuple(int(i) for i in idx), int(iterations[j, idx[0]]),
                                            float(tolerance[j, idx[0]])) for j, idx in enumerate(inputs)))
    for j, idx in enumerate(inputs):
        if spec.engine == "nearswap":
            weight[j, idx[0]] = np.float32(values["t"][j, idx[0]])
            continue
        if flat.segments[j].numel == 0:
            continue  # nothing to write (mergekit never sees an empty tensor)
        params = {name: values[name][j, idx] for name in per_model if name in values}
        params.update({name: values[name][j, idx[0]] for name in shared if name in values})
        if spec.name == "karcher":
            ci = karcher[j]
        else:
            try:
                ci = R.stats_coefficients(spec.name, grams[j][np.ix_(idx, idx)], params, flat.dtype)
            except R.UndefinedMergeError as error:
                raise R.UndefinedMergeError(f"{flat.segments[j].name or j}: {error}") from None
        (weight if with_base else coef)[j, idx] = ci
    if spec.engine == "nearswap":
        return "nearswap", None
    return ("task" if with_base else "combine"), None


def _functional_rows(spec: R.MethodSpec, flat: FlatSources, st, values: dict, inputs: list, modes: list,
                     with_base: bool, coef: np.ndarray, weight: np.ndarray) -> tuple:
    """The per-row table of model_stock (filter_wise) or nuslerp (nuslerp_flatten false):
    each row's coefficients from its Gram matrix (reference.row_coefficients); a segment
    whose mode is None keeps its tensor's coefficients, as one row."""
    M = flat.n_models
    grams = _row_grams(flat, st, inputs, modes, with_base)
    whole = st.delta_dots if with_base else st.dots
    per_model = {q.name for q in spec.tensor_params}
    row_coef = []
    for j, idx in enumerate(inputs):
        params = {name: values[name][j, idx] for name in per_model if name in values}
        if modes[j] is None:
            c = R.stats_coefficients(spec.name, whole[j][np.ix_(idx, idx)], params, flat.dtype)[None, :]
        else:
            c = R.row_coefficients(spec.name, grams[j][np.ix_(range(grams[j].shape[0]), idx, idx)], params)
        full = np.zeros((c.shape[0], M), dtype=np.float32)
        full[:, idx] = c
        shape = sharded.whole_shape(flat, j) if modes[j] is not None else ()
        row_coef.append((torch.from_numpy(full).to(flat.device), modes[j] is True, shape,
                         tuple(int(i) for i in idx)))
        (weight if with_base else coef)[j] = np.abs(full).max(0) if len(full) else 0.0
    return ("rows" if with_base else "rows_combine"), row_coef


def _inputs(spec: R.MethodSpec, flat: FlatSources, p: dict, rows: np.ndarray) -> list:
    """Per segment, the indices of its input models (p["active"], default all), checked
    against the method's input contract (a base is required by every caller)."""
    S, M = len(flat.segments), flat.n_models
    if flat.base is None:
        raise ValueError(f"{spec.name} needs a base model")
    active = _expand(p.get("active", 1.0), rows, S, M, "active") != 0
    lo, hi = spec.contract.non_base_range(with_base=True)
    out = []
    for j in range(S):
        idx = np.flatnonzero(active[j])
        if len(idx) < lo or (hi is not None and len(idx) > hi):
            want = f"{lo}" if hi == lo else f"{lo} to {hi}" if hi is not None else f"at least {lo}"
            raise ValueError(f"{spec.name} merges {want} models besides the base per tensor, "
                             f"{flat.segments[j].name or j} has {len(idx)}")
        out.append(idx)
    return out


def _chunked_deltas(flat: FlatSources, j: int, idx, chunk: int = 1 << 22):
    """mergekit's deltas bf16(X - B) of segment j's inputs, chunk by chunk."""
    seg = flat.segments[j]
    for lo in range(0, seg.numel, chunk):
        a, b = seg.offset + lo, seg.offset + min(seg.numel, lo + chunk)
        base = flat.base[a:b].float()
        yield [(flat.models[int(m), a:b].float() - base).to(flat.dtype) for m in idx]


def _sce_histograms(flat: FlatSources, st, inputs: list) -> list:
    """sce's variance-key histogram of every segment over its inputs (of the whole tensor:
    a split tensor's bins are summed across the tensor-parallel group): once, at the first
    table."""
    key = ("sce", tuple(tuple(int(i) for i in idx) for idx in inputs))
    if key not in st.extras:
        M = flat.n_models

        def bins(j):  # [1 + M, KEY_MAX + 1]: the counts, then each input's squared deltas
            out = torch.zeros((1 + M, R.KEY_MAX + 1), dtype=torch.float64)
            rows = [1 + int(m) for m in inputs[j]]
            for deltas in _chunked_deltas(flat, j, inputs[j]):
                c, q = R.sce_bins(R.sce_var_keys(deltas), deltas)
                out[0] += c.cpu().double()
                out[rows] += q.cpu()
            return out

        summed = sharded.summed_per_tensor(flat, bins, (1 + M, R.KEY_MAX + 1))
        st.extras[key] = [R.SceHistogram.from_bins(torch.from_numpy(summed[j][0]).to(torch.int64),
                                                   torch.from_numpy(summed[j][[1 + int(m) for m in idx]]))
                          for j, idx in enumerate(inputs)]
    return st.extras[key]


def _ram_counts(flat: FlatSources, st, inputs: list, thresholds: list) -> list:
    """ramplus_tl's (shared, unique) counts per segment (of the whole tensor: summed across
    the tensor-parallel group): once per epsilon, at the first table."""
    key = ("ram", tuple(tuple(int(i) for i in idx) for idx in inputs), tuple(thresholds))
    if key not in st.extras:
        M = flat.n_models

        def counts(j):  # [2, M]: shared, unique per model
            out = np.zeros((2, M))
            for deltas in _chunked_deltas(flat, j, inputs[j]):
                s, u = R.ram_counts(deltas, thresholds[j])
                out[0, inputs[j]] += s
                out[1, inputs[j]] += u
            return out

        summed = sharded.summed_per_tensor(flat, counts, (2, M))
        st.extras[key] = [(summed[j][0, idx].astype(np.int64).tolist(), summed[j][1, idx].astype(np.int64).tolist())
                          for j, idx in enumerate(inputs)]
    return st.extras[key]


def _fusion_codes(flat: FlatSources, st, inputs: list, seed: int) -> torch.Tensor:
    """arcee_fusion's keep bits [M, total] (uint8, flat's device), mergekit's own importance
    and threshold per tensor (a split tensor's base and input gathered across the
    tensor-parallel group, each rank keeping its block's bits): once per seed (it draws the
    sample of tensors over a million elements), at the first table."""
    key = ("fusion", seed, tuple(tuple(int(i) for i in idx) for idx in inputs))
    if key not in st.extras:
        codes = torch.zeros(flat.models.shape, dtype=torch.uint8, device=flat.device)

        def keep(j, values):  # values: the base's and the input's whole tensor
            seg = flat.segments[j]
            if values.shape[1] == 0:
                return torch.zeros(0, dtype=torch.bool, device=values.device)
            return R.fusion_keep(values[0], values[1], R.last_dim(sharded.whole_shape(flat, j)),
                                 R.fusion_generator(seed, seg.tensor_key))

        kept = sharded.whole_tensor_values(flat, lambda j: (-1, int(inputs[j][0])), keep)
        for j, (seg, idx) in enumerate(zip(flat.segments, inputs)):
            if seg.numel:
                block = kept[j][seg.elements(0, seg.numel, kept[j].device).long()]
                codes[int(idx[0]), seg.offset: seg.offset + seg.numel] = block.to(torch.uint8).to(flat.device)
        st.extras[key] = codes
    return st.extras[key]


def _elementwise(spec: R.MethodSpec, flat: FlatSources, p: dict, rows: np.ndarray, st, *, seed: int,
                 coef: np.ndarray, weight: np.ndarray, cut: tuple, keys: np.ndarray) -> tuple:
    """Fill the table of sce, ram / ramplus_tl or arcee_fusion from the load-time statistics;
    returns (kind, rank codes or None)."""
    lo, hi, p0, p1 = cut
    S, M = coef.shape
    inputs = _inputs(spec, flat, p, rows)
    shared = {q.name: _expand(p[q.name], rows, S, M, q.name) if q.name in p else np.full((S, M), float(q.default))
              for q in spec.global_params}
    if spec.engine == "fusion":
        for j, idx in enumerate(inputs):
            weight[j, idx[0]] = 1.0
            p0[j, idx[0]], p1[j, idx[0]] = 0, R.U24  # keep iff u24 < 2^24 * code
        keys[:] = flat.stream_keys(seed)
        return "task", _fusion_codes(flat, st, inputs, seed)
    if spec.engine == "sce":
        histograms = _sce_histograms(flat, st, inputs)
    else:
        thresholds = [R.ram_threshold(float(shared["epsilon"][j, int(idx[0])]), flat.dtype)
                      for j, idx in enumerate(inputs)]
        if spec.name == "ramplus_tl":
            ram_counts = _ram_counts(flat, st, inputs, thresholds)
    for j, idx in enumerate(inputs):
        coef[j, idx] = 1.0
        first = int(idx[0])
        if spec.engine == "sce":
            hist = histograms[j]
            c = R.sce_cut(hist, float(shared["select_topk"][j, first]))
            numel = int(np.prod(sharded.whole_shape(flat, j), dtype=np.int64))
            weight[j, idx] = R.sce_weights(hist, c, numel, flat.dtype)
            lo[j], hi[j], p0[j], p1[j] = c.lo, c.hi, c.q_lo, c.q_hi
            continue
        lo[j] = thresholds[j]
        weight[j, idx] = 1.0
        if spec.name == "ramplus_tl":
            weight[j, idx] = R.ramplus_lambdas(*ram_counts[j], float(shared["r"][j, first]),
                                               float(shared["alpha"][j, first]), float(shared["epsilon"][j, first]))
    if spec.engine == "sce":
        keys[:] = flat.stream_keys(seed)
        return "sce", None
    return ("ramplus" if spec.name == "ramplus_tl" else "ram"), None
