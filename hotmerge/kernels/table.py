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
