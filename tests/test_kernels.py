"""Merge kernels: parity with mergekit, random-mask properties, fused engine vs
reference (torch, Triton interpreter, CUDA), non-finite protection."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hotmerge.kernels import cpu_native as native
from hotmerge import kernels as F
from hotmerge.kernels import cpu_backend
from hotmerge.kernels import reference as R
from hotmerge.kernels.methods import METHODS

# the task-arithmetic family, linear and slerp; mergekit's functional methods: FUNCTIONAL_CASES
CLASSIC = sorted(m for m, spec in METHODS.items() if spec.engine in ("combine", "task"))
from hotmerge.kernels.stats import MagnitudeHistogram

REPO = Path(__file__).resolve().parents[1]
needs_mergekit = pytest.mark.skipif(importlib.util.find_spec("mergekit") is None,
                                    reason="mergekit (the parity oracle) is not installed")
GTA_DETERMINISTIC = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """bf16 ulp of |x| (normal range)."""
    a = x.float().abs().clamp(min=2.0**-126)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


def _sources(shape, m=3, scale=0.02, seed=0, dtype=torch.bfloat16):
    """Base ~ N(0,1) and M fine-tunes with deltas of varied magnitude."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    xs = []
    for _ in range(m):
        d = scale * torch.randn(shape, generator=g) * torch.exp(0.7 * torch.randn(shape, generator=g))
        xs.append((base.float() + d).to(dtype))
    return base, xs


# ---------------------------------------------------------------------------
# (a) reference vs mergekit


def _mk_gta(method, base, xs, params, *, normalize, rescale=None, lam=1.0):
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    spec = R.METHODS[method]
    group = TensorGroup.from_tensors([base, *xs], base_index=0)
    p = {
        "int8_mask": True,
        "normalize": normalize,
        "rescale": spec.default_rescale if rescale is None else rescale,
        "lambda": lam,
    }
    for name in ("weight", "density", "gamma", "epsilon"):
        if name in params:
            p[name] = {i + 1: float(v) for i, v in enumerate(params[name])}
    return registry.get(method).merge_group(group, **p)


def _cut_keys(spec, delta, density, gamma):
    """The |delta| keys at the ends of mergekit's kept rank range (where its argsort
    breaks ties and we draw a random share instead); zero deltas never matter."""
    keys = R.magnitude_keys(delta.reshape(-1))
    n = keys.numel()
    if density >= 1:
        return keys, set()
    rr = R.ties_rank_range(n, density) if spec.sparsify == "magnitude" else \
        R.outlier_rank_range(n, density, gamma)
    s = torch.sort(keys).values
    return keys, {int(s[rr[0]]), int(s[rr[1]])} - {0}


PARITY_CASES = [(m, False) for m in GTA_DETERMINISTIC + ["dare_ties", "della"]] + [
    ("ties", True),
    ("breadcrumbs_ties", True),
]


@needs_mergekit
@pytest.mark.parametrize("method,rescale", PARITY_CASES)
@pytest.mark.parametrize("normalize", [False, True])
def test_reference_matches_mergekit(method, rescale, normalize):
    """Within mergekit's own bf16 rounding, except at documented discrete differences.

    mergekit rounds every intermediate (w*delta, sums, divisor, rescale factor) to
    bf16; we round once. Tolerance per element: 1 ulp of the result + 2^-6 *
    |lambda| * sum|D_i| / divisor. Excluded: elements where some model's |delta|
    equals a pruning cut key (mergekit keeps exactly k, we keep every tie) and, for
    TIES consensus, elements whose kept terms nearly cancel (|sum D| <= 2^-6 sum|D|),
    where bf16 rounding can flip the majority sign.
    """
    spec = R.METHODS[method]
    shape = (48, 80)
    base, xs = _sources(shape, seed=1)
    m = len(xs)
    sparse_deterministic = method in GTA_DETERMINISTIC
    params = {
        "weight": [0.3, 0.5, 0.7],
        # random methods are deterministic only at density 1
        "density": [0.3, 0.5, 0.9] if sparse_deterministic else [1.0] * m,
        "gamma": [0.01, 0.05, 0.02],
        "epsilon": [0.1] * m,
    }
    lam = 0.8 if normalize else 1.0
    got = R.merge_tensor(method, base, xs, params, normalize=normalize, lambda_=lam,
                         rescale=rescale or None)
    ref = _mk_gta(method, base, xs, params, normalize=normalize, lam=lam, rescale=rescale or None)

    excluded = torch.zeros(shape, dtype=torch.bool)
    abs_d = torch.zeros(shape)
    sum_d = torch.zeros(shape)
    for i, x in enumerate(xs):
        delta = x - base
        keep, sparsified, l1_kept = R.keep_mask(spec, delta, params["density"][i], gamma=params["gamma"][i],
                                                model_key=i)
        if spec.sparse_mode == R.SPARSE_RANGE:
            keys, cut = _cut_keys(spec, delta, params["density"][i], params["gamma"][i])
            for c in cut:
                excluded |= (keys == c).reshape(shape)
        r = R.rescale_factor(delta, keep, l1_kept) if (rescale and sparsified) else 1.0
        w = R.round_param(params["weight"][i], base.dtype)
        d = torch.where(keep.reshape(shape), delta.float() * (w * r), 0.0)
        abs_d += d.abs()
        sum_d += d
    if spec.consensus:
        excluded |= sum_d.abs() <= 2.0**-6 * abs_d
    div = 1.0
    if normalize:
        div = min(params["weight"]) if spec.consensus else sum(params["weight"])
    tol = _ulp(torch.maximum(got.float().abs(), ref.float().abs())) + 2.0**-6 * lam * abs_d / div
    diff = (got.float() - ref.float()).abs()
    assert (diff[~excluded] <= tol[~excluded]).all(), f"max excess {(diff - tol)[~excluded].max()}"
    assert excluded.float().mean() < 0.25  # bf16 deltas are coarse: cut bins are big
    assert (diff == 0).float().mean() > 0.8  # most elements agree exactly


@needs_mergekit
@pytest.mark.parametrize("sparsify", ["magnitude", "magnitude_outliers"])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.8])
def test_magnitude_masks_match_mergekit(sparsify, density):
    """Same kept set as mergekit off the cut bins; in them, mergekit's count in expectation."""
    from mergekit.sparsify import magnitude, magnitude_outliers

    spec = R.METHODS["ties" if sparsify == "magnitude" else "breadcrumbs"]
    base, (x,) = _sources((64, 96), m=1, seed=2)
    delta = x - base
    gamma = 0.03
    if sparsify == "magnitude":
        mk = magnitude(delta, density)
    else:
        mk = magnitude_outliers(delta, density, gamma=gamma)
    mk_keep = (mk != 0).reshape(-1)
    keep, _, l1_kept = R.keep_mask(spec, delta, density, gamma=gamma, seed=4)
    keys, cut = _cut_keys(spec, delta, density, gamma)
    nonzero = (delta != 0).reshape(-1)
    in_cut = torch.zeros_like(keep)
    for c in cut:
        in_cut |= keys == c
    assert torch.equal((keep & nonzero)[~in_cut], mk_keep[~in_cut])
    for c in cut:  # per cut bin: kept count ~ Binomial(bin size, mergekit's share)
        b = keys == c
        n_mk, size = int(mk_keep[b].sum()), int(b.sum())
        q = n_mk / size
        assert abs(int(keep[b].sum()) - n_mk) <= 5 * (size * q * (1 - q)) ** 0.5 + 1
    # the rescale's kept L1 is mergekit's exactly
    assert abs(l1_kept - float(mk.double().abs().sum())) <= 1e-9 * l1_kept


@needs_mergekit
def test_linear_matches_mergekit():
    from mergekit.merge_methods.base import TensorBatch
    from mergekit.merge_methods.linear import linear_merge

    _, xs = _sources((64, 80), seed=4, scale=0.5)
    w = [0.3, 0.5, 0.7]
    for normalize in (False, True):
        batch = TensorBatch(tuple(x.unsqueeze(0) for x in xs))
        ref = linear_merge.merge_batch(batch, weight=torch.tensor([w]), normalize=normalize)[0]
        got = R.merge_tensor("linear", None, xs, {"weight": w}, normalize=normalize)
        diff = (got.float() - ref.float()).abs()
        # 1 ulp of the operands' scale (float32 rounding, e.g. a fused multiply-add
        # in mergekit's addcmul, shows up where the weighted sum cancels)
        scale = sum(wi * x.float().abs() for wi, x in zip(w, xs)) / (sum(w) if normalize else 1)
        assert (diff <= _ulp(torch.maximum(scale, ref.float().abs()))).all()
        assert (diff == 0).float().mean() > 0.99


@needs_mergekit
@pytest.mark.parametrize("case", ["related", "unrelated", "collinear", "zero"])
def test_slerp_matches_mergekit(case):
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    base, (x,) = _sources((64, 80), m=1, seed=5, scale=0.3)
    if case == "unrelated":
        x = torch.randn(base.shape, generator=torch.Generator().manual_seed(9)).bfloat16()
    elif case == "collinear":
        x = (base.float() * 1.5).bfloat16()
    elif case == "zero":
        base = torch.zeros_like(base)
    for t in (0.0, 0.3, 0.77, 1.0):
        ref = mk_slerp(torch.tensor([t]), base.unsqueeze(0), x.unsqueeze(0))[0]
        got = R.merge_tensor("slerp", base, [x], {"t": t}, normalize=False)
        diff = (got.float() - ref.float()).abs()
        # 1 ulp of the operands' scale: the float64 dot product can move s0, s1 by
        # a float32 ulp versus mergekit's float32 one
        scale = torch.maximum(base.float().abs(), x.float().abs())
        assert (diff <= _ulp(torch.maximum(scale, ref.float().abs()))).all(), (case, t)
        assert (diff == 0).float().mean() > 0.99


def test_della_rank_codes_match_mergekit_ranks():
    """Our 8-bit codes are mergekit's normalised row ranks (float32 math) to 1/510."""
    base, (x,) = _sources((12, 300), m=1, seed=6)
    delta = x - base
    keys = R.magnitude_keys(delta.reshape(-1))
    codes = R.della_rank_codes(keys, 300).reshape(12, 300).float()
    ranks = torch.argsort(torch.argsort(keys.reshape(12, 300), dim=1, stable=True), dim=1).float() + 1
    rank_norm = (ranks - 1) / (300 - 1)  # mergekit's formula with stable tie order
    assert (codes / 255 - rank_norm).abs().max() <= 0.5 / 255 + 1e-6
    # mergekit's own probabilities, minus its bf16 rank quantisation
    d, eps = 0.5, 0.15
    p0, p1 = R.della_thresholds(d, eps)
    ours = (p0 + p1 * codes) / R.U24
    theirs = (d - eps) + rank_norm * 2 * eps
    assert (ours - theirs).abs().max() <= eps / 255 + 1e-6


def test_della_epsilon_validation_matches_mergekit():
    with pytest.raises(ValueError):
        R.della_thresholds(0.1, 0.15)
    with pytest.raises(ValueError):
        R.della_thresholds(0.9, 0.15)


# ---------------------------------------------------------------------------
# (b) random masks


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.8])
def test_random_mask_density(method, density):
    spec = R.METHODS[method]
    base, (x,) = _sources((128, 512), m=1, seed=7)
    delta = x - base
    keep, sparsified, _ = R.keep_mask(spec, delta, density, epsilon=0.05, seed=3)
    assert sparsified
    n = keep.numel()
    if method == "dare_linear":
        p = R.round_param(density, torch.bfloat16)
        expected, var = p * n, p * (1 - p) * n
    else:
        p0, p1 = R.della_thresholds(density, 0.05)
        codes = R.della_rank_codes(R.magnitude_keys(delta.reshape(-1)), 512).double()
        probs = (p0 + p1 * codes) / R.U24
        expected, var = float(probs.sum()), float((probs * (1 - probs)).sum())
        # larger magnitudes are kept more often
        low, high = codes < 64, codes >= 192
        assert keep[high].float().mean() > keep[low].float().mean()
    assert abs(int(keep.sum()) - expected) <= 5 * var**0.5


def test_random_mask_reproducible_and_keyed():
    spec = R.METHODS["dare_ties"]
    _, (x,) = _sources((64, 256), m=1, seed=8)
    a = R.keep_mask(spec, x, 0.5, seed=1, model_key=0, tensor_key=11)[0]
    assert torch.equal(a, R.keep_mask(spec, x, 0.5, seed=1, model_key=0, tensor_key=11)[0])
    for other in (dict(seed=2, model_key=0, tensor_key=11), dict(seed=1, model_key=1, tensor_key=11),
                  dict(seed=1, model_key=0, tensor_key=12)):
        b = R.keep_mask(spec, x, 0.5, **other)[0]
        agree = (a == b).float().mean()
        assert 0.45 < agree < 0.55  # independent streams agree half the time


def test_random_u24_matches_python_words():
    """The torch int32 implementation equals the hash on Python integers (wrapping
    multiplies, logical shifts), including the scalar tail of vectorised loops."""
    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & R.MASK32
        x ^= x >> 15
        x = (x * 0x846CA68B) & R.MASK32
        return x ^ (x >> 16)

    k1, mult = R.stream_keys(5, 1, 77)
    idx = [0, 1, 2, 12345, (1 << 31) - 1, 1 << 31, (1 << 32) - 1]
    want = [lowbias32((e * mult + k1) & R.MASK32) >> 8 for e in idx]
    assert R.random_u24(torch.tensor(idx, dtype=torch.int64), k1, mult).tolist() == want
    idx = list(range(1000, 1037))  # odd length: vector body and tail
    want = [lowbias32((e * mult + k1) & R.MASK32) >> 8 for e in idx]
    assert R.random_u24(R.element_indices(1000, 1037), k1, mult).tolist() == want


def test_random_u24_uniform():
    u = R.random_u24(torch.arange(1 << 16), *R.stream_keys(0, 0, 0)).double() / R.U24
    assert abs(float(u.mean()) - 0.5) < 0.01
    hist = torch.histc(u.float(), bins=16, min=0, max=1)
    assert (hist - (1 << 12)).abs().max() < 5 * 64


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_l1_rescale_exact(method):
    """masked * ||delta||_1 / ||masked||_1 has the L1 norm of delta."""
    spec = R.METHODS[method]
    base, xs = _sources((32, 128), m=2, seed=9)
    delta = xs[0] - base
    keep, _, _ = R.keep_mask(spec, delta, 0.4, epsilon=0.1, seed=5)
    r = R.rescale_factor(delta, keep)
    masked = torch.where(keep.reshape(delta.shape), delta.double() * r, 0.0)
    assert abs(float(masked.abs().sum()) / float(delta.double().abs().sum()) - 1) < 1e-12
    # and in the fused table: float32 scale = weight * r
    flat = F.FlatSources.from_tensors([[x] for x in xs], [base])
    table = F.build_table(method, flat, {"weight": [1.0, 1.0], "density": [0.4, 0.4], "epsilon": 0.1},
                          normalize=False, seed=5)
    kept = cpu_backend.l1_kept(flat, table)
    scale = table.scales(kept)
    assert np.allclose(kept * scale, table.l1, rtol=1e-6)


# ---------------------------------------------------------------------------
# stats


def test_histogram_lookup_matches_sort():
    base, (x,) = _sources((50, 70), m=1, seed=10)
    delta = (x - base).reshape(-1)
    keys = R.magnitude_keys(delta)
    h = MagnitudeHistogram.from_counts(torch.bincount(keys, minlength=R.KEY_MAX + 1), delta.dtype)
    s = torch.sort(keys).values
    for rank in [0, 1, 17, 1000, keys.numel() // 2, keys.numel() - 1]:
        assert h.key_at(rank) == int(s[rank])
    lo, hi = int(s[500]), int(s[3000])
    inside = (keys >= lo) & (keys <= hi)
    assert abs(h.l1_between(lo, hi) - float(delta[inside].double().abs().sum())) < 1e-9
    assert abs(h.l1_between(0, R.KEY_MAX) - float(delta.double().abs().sum())) < 1e-9


# ---------------------------------------------------------------------------
# (c) fused engine vs reference (torch path)

# (4, 3, 10): rows along the last dimension (arcee_fusion's softmax, as mergekit's dim=-1) are
# not della's rows (numel / shape[0]) once a tensor has three dimensions.
SHAPES = [(16, 24), (40,), (8, 8), (1,), (0,), (3, 5), (2, 33), (4, 3, 10)]
M = 3


def _layout(seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    models = [[(b.float() + 0.05 * torch.randn(b.shape, generator=g)).to(dtype) for b in base]
              for _ in range(M)]
    flat = F.FlatSources.from_tensors(models, base, names=[f"layer.{j}.weight" for j in range(len(SHAPES))])
    # segments share parameter rows the way layer groups do
    for j, s in enumerate(flat.segments):
        s.param_row = j % 2
    return flat, base, models


def _gather(flat, out):
    """The segments' values from a flat output (the layout pads between segments)."""
    return torch.cat([out[s.offset: s.offset + s.numel] for s in flat.segments])


def _candidate(method, seed=0):
    rng = np.random.default_rng(seed)
    if method == "slerp":
        return {"t": rng.uniform(0, 1, 2), "pair": np.array([[0, 2], [1, 0]])}
    return {
        "weight": rng.uniform(0.1, 1.0, (2, M)),
        "density": rng.uniform(0.3, 0.7, (2, M)),
        "gamma": rng.uniform(0.0, 0.1, (2, M)),
        "epsilon": np.full((2, M), 0.1),
    }


def _expected(flat, base, models, method, params, *, normalize, lambda_=1.0, seed=0):
    parts = []
    for j, s in enumerate(flat.segments):
        row = s.param_row
        if method == "slerp":
            i0, i1 = params["pair"][row]
            out = R.merge_tensor("slerp", models[i0][j], [models[i1][j]], {"t": params["t"][row]},
                                 normalize=normalize)
        else:
            p = {k: v[row] for k, v in params.items()}
            out = R.merge_tensor(method, base[j], [mm[j] for mm in models], p, normalize=normalize,
                                 lambda_=lambda_, seed=seed, tensor_key=s.tensor_key,
                                 model_keys=flat.model_keys, row_len=s.row_len)
        parts.append(out.reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("method", CLASSIC)
@pytest.mark.parametrize("normalize", [False, True])
def test_fused_torch_equals_reference(method, normalize):
    flat, base, models = _layout()
    params = _candidate(method)
    lam = 0.7 if normalize else 1.0
    table = F.build_table(method, flat, params, normalize=normalize, lambda_=lam, seed=3)
    out = torch.full((flat.total,), 7.0, dtype=torch.bfloat16)
    F.apply(flat, table, out, backend="torch")
    expected = _expected(flat, base, models, method, params, normalize=normalize, lambda_=lam, seed=3)
    assert torch.equal(_gather(flat, out), expected)
    # per-segment live tensors
    views = [torch.zeros(s, dtype=torch.bfloat16) for s in SHAPES]
    F.apply(flat, table, views, backend="torch")
    assert torch.equal(torch.cat([v.reshape(-1) for v in views]), expected)


def test_fused_negative_weights_and_genotype_array():
    flat, base, models = _layout(seed=1)
    geno = np.stack([np.array([[0.6, -0.4, 0.5], [0.2, 0.9, -0.3]]),
                     np.array([[0.5, 0.4, 0.7], [0.6, 0.3, 0.8]])], axis=-1)  # [rows, M, (w, d)]
    table = F.build_table("ties", flat, geno, normalize=True)
    out = torch.zeros(flat.total, dtype=torch.bfloat16)
    F.apply(flat, table, out, backend="torch")
    expected = _expected(flat, base, models, "ties", {"weight": geno[..., 0], "density": geno[..., 1]},
                         normalize=True)
    assert torch.equal(_gather(flat, out), expected)


def test_fused_fp16():
    flat, base, models = _layout(seed=2, dtype=torch.float16)
    params = _candidate("dare_ties", seed=2)
    table = F.build_table("dare_ties", flat, params, normalize=True, seed=1)
    out = torch.zeros(flat.total, dtype=torch.float16)
    F.apply(flat, table, out, backend="torch")
    assert torch.equal(_gather(flat, out), _expected(flat, base, models, "dare_ties", params, normalize=True,
                                                     seed=1))


def test_slerp_genes_decoding():
    genes = np.array([[0.1, 0.9, 0.4], [0.7, 0.2, 0.3]])
    pair, t = F.slerp_from_genes(genes)
    assert pair.tolist() == [[1, 2], [0, 2]]
    softmax_second = [np.exp(0.4) / (np.exp(0.9) + np.exp(0.4)), np.exp(0.3) / (np.exp(0.7) + np.exp(0.3))]
    assert np.allclose(t, softmax_second)


# ---------------------------------------------------------------------------
# (c2) the CPU fast path (cpu_backend.merge_segment_fast) against the chunk path
# (merge_chunk_torch), bit for bit. Small steps (monkeypatched) make these small
# layouts run through many steps, each split into one part per thread.


def _zero_edge_layout(seed, dtype=torch.bfloat16):
    """Sources with every zero and sign case the fast path's sums must respect:
    base +0 / -0, deltas -0 (X = -0, B = +0), +0 (X = B, also B = X = -0), tiny
    deltas next to large ones (an L1 norm that float64 cannot sum exactly)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(40, 33), (700,), (9,), (1,), (64, 20)]
    base = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    models = [[b + torch.randn(b.shape, generator=g) * 4e-4 for b in base] for _ in range(M)]
    for b, *xs in zip(base, *models):
        bf, n = b.view(-1), b.numel()
        idx = torch.randperm(n, generator=g)[: max(1, n // 4)]
        q = max(1, len(idx) // 4)
        bf[idx[:q]] = 0.0
        bf[idx[q: 2 * q]] = -0.0
        for x in xs:
            xf = x.view(-1)
            xf[idx[: q // 2]] = -0.0  # delta -0
            xf[idx[q: 2 * q]] = -0.0  # -0 - -0: delta +0 on a -0 base
            xf[idx[2 * q: 3 * q]] = bf[idx[2 * q: 3 * q]]  # delta 0
    base[0].view(-1)[:5] = 1e-30  # tiny deltas in the first tensor
    for mm in models:
        mm[0].view(-1)[:5] = 3e-30
    base = [b.to(dtype) for b in base]
    models = [[x.to(dtype) for x in mm] for mm in models]
    flat = F.FlatSources.from_tensors(models, base, names=[f"edge.{j}" for j in range(len(shapes))])
    for j, s in enumerate(flat.segments):
        s.param_row = j % 2
    return flat


def _apply_or_bad(flat, table, out):
    """apply, returning the segments it refused (None when it wrote)."""
    try:
        F.apply(flat, table, out, backend="torch")
    except F.NonFiniteMergeError as err:
        return err.segments
    return None


FAST_WEIGHTS = {
    "positive": [[0.5, 0.3, 0.8], [0.9, 0.2, 0.6]],
    "mixed": [[0.6, -0.4, 0.5], [-0.3, 0.9, 0.2]],
    "negative": [[-0.5, -0.3, -0.7], [-0.6, -0.2, -0.9]],
    "zero_tiny": [[0.7, 0.0, 2.0**-20], [0.0, 0.0, 0.0]],
}


def _native(monkeypatch, on: bool) -> None:
    """Switch the compiled CPU kernel on or off; on, split its work into small parts."""
    monkeypatch.setenv("HOTMERGE_NATIVE", "1" if on else "0")
    if on:
        assert native.available(), f"the native CPU kernel did not build: {native.failure()}"
        monkeypatch.setattr(native, "MIN_PER_THREAD", 16)


def test_native_kernel_is_used_where_it_applies(monkeypatch):
    _native(monkeypatch, True)
    flat = _zero_edge_layout(seed=20)
    calls = []
    for name in ("combine", "merge"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    expected = {"linear": "combine", "slerp": "combine", "task_arithmetic": "merge", "ties": "merge",
                "breadcrumbs_ties": "merge", "dare_ties": "merge", "della": None}  # DELLA: torch
    for method, kernel in expected.items():
        calls.clear()
        params = {"t": 0.3, "pair": [0, 2]} if method == "slerp" else \
            {"weight": [0.5, 0.3, 0.8], "density": 0.5, "gamma": 0.05, "epsilon": 0.1}
        F.apply(flat, F.build_table(method, flat, params, normalize=False), torch.zeros(flat.total, dtype=torch.bfloat16))
        if method == "breadcrumbs_ties":  # a segment whose masks drop every delta is the base, in torch
            assert calls and set(calls) == {kernel}, method
        else:
            assert calls == ([kernel] * len(flat.segments) if kernel else []), method


def test_without_a_compiler_the_torch_path_merges(monkeypatch, caplog):
    monkeypatch.setenv("HOTMERGE_NATIVE", "1")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    flat = _zero_edge_layout(seed=25)
    table = F.build_table("ties", flat, {"weight": [0.5, 0.3, 0.8], "density": 0.5}, normalize=True)
    out = torch.zeros(flat.total, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="hotmerge"):
        F.apply(flat, table, out)
    assert not native.available() and "no C compiler" in native.failure()
    assert "torch path" in caplog.text
    monkeypatch.setenv("HOTMERGE_NATIVE", "0")
    expected = torch.zeros(flat.total, dtype=torch.bfloat16)
    F.apply(flat, table, expected)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.slow  # a randomised sweep: tens of seconds on two cores
def test_native_equals_torch_on_random_layouts(monkeypatch):
    """Random model counts, shapes, delta scales, weights (negative too), densities,
    normalize and lambda: the C kernel and the torch fast path give the same bits."""
    rng = np.random.default_rng(1)
    monkeypatch.setattr(native, "MIN_PER_THREAD", 1000)
    compared = 0
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        n_models = int(rng.integers(1, 5))
        shapes = [(int(rng.integers(1, 300)), int(rng.integers(1, 200))) for _ in range(3)]
        base = [torch.randn(s, generator=g) * 0.02 for s in shapes]
        models = [[(b + torch.randn(b.shape, generator=g) * float(rng.choice([1e-4, 1e-3, 1e-2]))).bfloat16()
                   for b in base] for _ in range(n_models)]
        flat = F.FlatSources.from_tensors(models, [b.bfloat16() for b in base],
                                          names=[f"model.layers.{j}.mlp.up_proj.weight" for j in range(3)])
        for method in ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear"):
            params = {"weight": rng.normal(0.5, 0.6, n_models), "density": rng.uniform(0.05, 1.0, n_models),
                      "gamma": 0.05}
            table = F.build_table(method, flat, params, normalize=bool(rng.integers(0, 2)),
                                  lambda_=float(rng.choice([1.0, 0.7])), seed=trial)
            outs = []
            for use_native in (True, False):
                _native(monkeypatch, use_native)
                out = torch.zeros(flat.total, dtype=torch.bfloat16)
                outs.append(out if _apply_or_bad(flat, table, out) is None else None)
            assert (outs[0] is None) == (outs[1] is None), (trial, method)
            if outs[0] is not None:
                assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16)), (trial, method)
                compared += 1
    assert compared >= 100


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype,use_native", [(torch.bfloat16, True), (torch.bfloat16, False),
                                              (torch.float16, False)],  # native: bf16 only
                         ids=["bf16-native", "bf16-torch", "fp16-torch"])
def test_fast_path_equals_chunk_path(monkeypatch, threads, dtype, use_native):
    _native(monkeypatch, use_native)
    monkeypatch.setattr(cpu_backend, "_GRAIN", 16)
    monkeypatch.setattr(cpu_backend, "_COLS", 96)
    flat = _zero_edge_layout(seed=21, dtype=dtype)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for method in CLASSIC:
            for wname, w in FAST_WEIGHTS.items():
                for normalize in (False, True):
                    if method == "slerp":
                        params = {"t": [0.3, 0.8], "pair": [[0, 2], [1, 0]]}
                    else:
                        params = {"weight": np.array(w), "density": np.array([[0.4, 0.6, 0.5], [1.0, 0.5, 0.0]]),
                                  "gamma": 0.05, "epsilon": 0.1}
                    table = F.build_table(method, flat, params, normalize=normalize,
                                          lambda_=0.7 if normalize else 1.0, seed=5)
                    fast, slow = (torch.full((flat.total,), 3.0, dtype=dtype) for _ in range(2))
                    raised = [_apply_or_bad(flat, table, fast)]
                    with monkeypatch.context() as mp:
                        mp.setattr(cpu_backend, "fast_ok", lambda flat: False)
                        raised.append(_apply_or_bad(flat, table, slow))
                    assert raised[0] == raised[1], (method, wname, normalize)
                    assert torch.equal(fast.view(torch.int16), slow.view(torch.int16)), (method, wname, normalize)
                    if method == "slerp":
                        break
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("variant", ["streamed", "cache_too_small", "not_streamed"])
def test_fast_path_random_masks(monkeypatch, variant):
    """DARE / DELLA rescale: masked L1 per segment then the merge (cached masked
    deltas, or recomputed), or the L1 pass over all segments first."""
    monkeypatch.setattr(cpu_backend, "_GRAIN", 16)
    monkeypatch.setattr(cpu_backend, "_COLS", 96)
    if variant == "cache_too_small":
        monkeypatch.setattr(cpu_backend, "_CACHE_BYTES", 64)
    if variant == "not_streamed":
        monkeypatch.setattr(cpu_backend, "stream_ok", lambda flat, table: False)
    flat = _zero_edge_layout(seed=22)
    # deltas of 2^30 next to ~1e-3 ones: the masked L1 there takes the reference summation
    seg = flat.segments[1]
    flat.models[0, seg.offset: seg.offset + 40] = 2.0 ** 30
    flat.stats = None
    for method in ("dare_ties", "dare_linear", "della", "della_linear"):
        for w in FAST_WEIGHTS.values():
            params = {"weight": np.array(w), "density": np.array([[0.4, 0.6, 0.5], [1.0, 0.5, 0.0]]),
                      "epsilon": 0.1}
            table = F.build_table(method, flat, params, normalize=True, seed=7)
            fast = torch.zeros(flat.total, dtype=torch.bfloat16)
            F.apply(flat, table, fast, backend="torch")
            with monkeypatch.context() as mp:
                mp.setattr(cpu_backend, "fast_ok", lambda flat: False)
                slow = torch.zeros(flat.total, dtype=torch.bfloat16)
                F.apply(flat, table, slow, backend="torch")
                kept_slow = cpu_backend.l1_kept(flat, table)
            assert torch.equal(fast.view(torch.int16), slow.view(torch.int16)), (method, w)
            assert np.array_equal(cpu_backend.l1_kept(flat, table), kept_slow, equal_nan=True)


def test_l1_exactness_guard(monkeypatch):
    """The fast masked L1 sums in its own order, so it is used only where every
    float64 summation order gives the same value; other (segment, model) pairs are
    summed by the reference loop."""
    flat = _zero_edge_layout(seed=24)
    seg = flat.segments[1]
    flat.models[0, seg.offset: seg.offset + 40] = 2.0 ** 30  # next to deltas ~1e-3
    flat.stats = None
    table = F.build_table("dare_linear", flat, {"weight": [0.5, 0.3, 0.8], "density": 0.5},
                          normalize=False, seed=3)
    assert not cpu_backend._l1_sum_is_exact(flat, 1, 0)
    assert cpu_backend._l1_sum_is_exact(flat, 1, 1) and cpu_backend._l1_sum_is_exact(flat, 4, 0)
    # where accepted: any order of the float64 sum gives the same bits
    s4 = flat.segments[4]
    a = (flat.models[0, s4.offset: s4.offset + s4.numel].float()
         - flat.base[s4.offset: s4.offset + s4.numel].float()).bfloat16().double().abs()
    g = torch.Generator().manual_seed(0)
    sums = {float(a[torch.randperm(len(a), generator=g)].cumsum(0)[-1]) for _ in range(5)}
    assert len(sums | {float(a.sum()), float(a.flip(0).cumsum(0)[-1])}) == 1
    # where rejected: the reference summation is used
    calls = []
    ref = cpu_backend.l1_kept_reference
    monkeypatch.setattr(cpu_backend, "l1_kept_reference",
                        lambda flat, table, j, m: calls.append((j, m)) or ref(flat, table, j, m))
    cpu_backend.l1_kept(flat, table)
    assert (1, 0) in calls and (1, 1) not in calls


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_fast_path_matches_reference_on_edges(monkeypatch, use_native):
    """The fast path against the per-tensor oracle itself, on the zero-edge layout."""
    _native(monkeypatch, use_native)
    monkeypatch.setattr(cpu_backend, "_GRAIN", 16)
    monkeypatch.setattr(cpu_backend, "_COLS", 96)
    flat = _zero_edge_layout(seed=23)
    base = [flat.base[s.offset: s.offset + s.numel].clone() for s in flat.segments]
    models = [[flat.models[m, s.offset: s.offset + s.numel].clone() for s in flat.segments] for m in range(M)]
    for method in ("task_arithmetic", "ties", "linear", "dare_linear"):
        params = {"weight": np.array(FAST_WEIGHTS["negative"]), "density": np.full((2, M), 0.5)}
        table = F.build_table(method, flat, params, normalize=False, seed=2)
        out = torch.zeros(flat.total, dtype=torch.bfloat16)
        F.apply(flat, table, out, backend="torch")
        assert torch.equal(_gather(flat, out).view(torch.int16),
                           _expected(flat, base, models, method, params, normalize=False, seed=2).view(torch.int16))


# The parity matrix: every method of the registry on every CPU backend, against the
# per-tensor reference (the Triton kernels: test_triton_interpreter_equals_torch runs
# every method the same way, and the CUDA tests on a GPU).
CPU_BACKENDS = ["torch_chunks", "cpu_fast_torch", "cpu_native"]

# mergekit's functional methods the engine applies: (method, params, with a base); "active"
# marks the models a tensor takes where the method takes fewer than all of them.
FUNCTIONAL_CASES = [
    ("model_stock", {}, True),
    ("nuslerp", {"weight": [[0.3, 0.8, 0.0], [0.6, 0.0, 0.2]], "active": [[1, 1, 0], [1, 0, 1]]}, True),
    ("nuslerp", {"weight": [0.3, 0.0, 0.8], "active": [1, 0, 1]}, False),
    ("multislerp", {"weight": [[0.3, 0.8, 0.5], [1.2, -0.2, 0.4]]}, True),
    ("multislerp", {"weight": [0.3, 0.8, 0.5], "normalize_weights": 0.0}, False),
    ("karcher", {}, False),
    ("karcher", {"max_iter": 3, "tol": 1e-3}, False),
    ("passthrough", {"scale": [[0.0, 0.7, 0.0], [1.0, 0.0, 0.0]], "active": [[0, 1, 0], [1, 0, 0]]}, False),
    ("nearswap", {"t": [[0.0, 0.03, 0.0], [0.0, 0.0, 0.2]], "active": [[0, 1, 0], [0, 0, 1]]}, True),
    ("sce", {"select_topk": [[0.5] * 3, [1.0] * 3]}, True),
    ("sce", {"select_topk": [[0.3] * 3, [0.0] * 3], "active": [[1, 1, 0], [1, 1, 1]]}, True),
    ("ram", {"epsilon": 0.03}, True),
    ("ramplus_tl", {"r": [[0.5] * 3, [0.1] * 3], "alpha": 2.0, "epsilon": 0.03, "active": [[0, 1, 1], [1, 1, 1]]},
     True),
    ("arcee_fusion", {"active": [[0, 1, 0], [0, 0, 1]]}, True),
]


def _functional_expected(flat, base, models, method, params, with_base):
    """reference.merge_tensor per segment, over the segment's active models."""
    parts = []
    for j, s in enumerate(flat.segments):
        row = s.param_row
        p = {k: (np.asarray(v, dtype=np.float64) if np.ndim(v) == 0 else
                 np.broadcast_to(np.asarray(v, dtype=np.float64), (2, M))[row]) for k, v in params.items()}
        idx = np.flatnonzero(p.pop("active", np.ones(M)))
        shared = {q.name for q in METHODS[method].global_params}
        p = {k: (float(v[idx[0]]) if k in shared else v[idx]) if v.ndim else float(v) for k, v in p.items()}
        if s.numel == 0:
            parts.append(base[j].reshape(-1))
            continue
        out = R.merge_tensor(method, base[j] if with_base else None, [models[i][j] for i in idx], p,
                             normalize=False, tensor_key=s.tensor_key, model_keys=flat.model_keys,
                             row_len=s.row_len)
        parts.append(out.reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=lambda c: c if isinstance(c, str) else None)
def test_functional_methods_equal_reference(monkeypatch, backend, case):
    """The load-time statistics plus the combine / task / nearswap kernels give
    reference.merge_tensor's bits, on every CPU path, flat and per-tensor outputs."""
    method, params, with_base = case
    if backend == "torch_chunks":
        monkeypatch.setattr(cpu_backend, "fast_ok", lambda flat: False)
    else:
        _native(monkeypatch, backend == "cpu_native")
    flat, base, models = _layout(seed=41)
    if not with_base:
        flat = F.FlatSources(flat.models, flat.segments)
    table = F.build_table(method, flat, params, normalize=True, lambda_=0.5)  # both ignored
    expected = _functional_expected(flat, base, models, method, params, with_base)
    out = torch.full((flat.total,), 5.0, dtype=torch.bfloat16)
    F.apply(flat, table, out)
    assert torch.equal(_gather(flat, out), expected), (method, backend)
    views = [torch.zeros(s, dtype=torch.bfloat16) for s in SHAPES]
    F.apply(flat, table, views)
    assert torch.equal(torch.cat([v.reshape(-1) for v in views]), expected)


def test_functional_statistics_are_computed_once():
    """Candidate after candidate, the Gram matrices come from the load-time statistics:
    no apply recomputes them, and a new weight changes only the coefficients."""
    flat, base, models = _layout(seed=42)
    first = F.build_table("multislerp", flat, {"weight": [0.2, 0.5, 0.9]}, normalize=False)
    stats = flat.stats
    assert stats.delta_dots is not None and stats.delta_dots.shape == (len(SHAPES), M, M)
    second = F.build_table("multislerp", flat, {"weight": [0.9, 0.5, 0.2]}, normalize=False)
    assert flat.stats is stats
    assert not np.array_equal(first.weight, second.weight)
    out = torch.zeros(flat.total, dtype=torch.bfloat16)
    F.apply(flat, second, out)
    expected = _functional_expected(flat, base, models, "multislerp", {"weight": [0.9, 0.5, 0.2]}, True)
    assert torch.equal(_gather(flat, out), expected)


def test_karcher_follows_sources_changed_in_place():
    """karcher's iterations are cached with the statistics: sources written in place (then
    flat.stats = None, as layout.FlatSources asks) give the new sources' merge, not the old."""
    flat, _, _ = _layout(seed=44)
    flat = F.FlatSources(flat.models, flat.segments)
    F.apply(flat, F.build_table("karcher", flat, {}, normalize=False), torch.zeros(flat.total, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(45)
    flat.models.copy_(torch.randn(flat.models.shape, generator=g).bfloat16())
    flat.stats = None
    out = torch.zeros(flat.total, dtype=torch.bfloat16)
    F.apply(flat, F.build_table("karcher", flat, {}, normalize=False), out)
    expected = []
    for s in flat.segments:
        if s.numel:
            rows = [flat.models[m, s.offset: s.offset + s.numel] for m in range(M)]
            expected.append(R.merge_tensor("karcher", None, rows, {}, normalize=False))
    assert torch.equal(torch.cat([out[s.offset: s.offset + s.numel] for s in flat.segments if s.numel]),
                       torch.cat(expected))


def test_functional_methods_refuse_the_wrong_number_of_inputs():
    flat, _, _ = _layout(seed=43)
    with pytest.raises(ValueError, match="nuslerp merges 2 models besides the base"):
        F.build_table("nuslerp", flat, {"weight": [0.3, 0.3, 0.4]}, normalize=False)
    with pytest.raises(ValueError, match="nearswap merges 1 models"):
        F.build_table("nearswap", flat, {"t": 0.1}, normalize=False)
    with pytest.raises(ValueError, match="arcee_fusion merges 1 models besides the base"):
        F.build_table("arcee_fusion", flat, {}, normalize=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", CLASSIC)
def test_parity_matrix(monkeypatch, method, backend):
    if backend == "torch_chunks":
        monkeypatch.setattr(cpu_backend, "fast_ok", lambda flat: False)
    else:
        _native(monkeypatch, backend == "cpu_native")
        monkeypatch.setattr(cpu_backend, "_GRAIN", 16)
        monkeypatch.setattr(cpu_backend, "_COLS", 96)
    flat, base, models = _layout(seed=31)
    params = _candidate(method, seed=5)
    for normalize in (False, True):
        lam = 0.8 if normalize else 1.0
        table = F.build_table(method, flat, params, normalize=normalize, lambda_=lam, seed=6)
        out = torch.full((flat.total,), 5.0, dtype=torch.bfloat16)
        F.apply(flat, table, out, backend="torch")
        expected = _expected(flat, base, models, method, params, normalize=normalize, lambda_=lam, seed=6)
        assert torch.equal(_gather(flat, out), expected), (method, backend, normalize)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_half_subtraction_rounds_once(dtype):
    """The fast path computes deltas as one subtraction in the source dtype; torch
    evaluates it in float32 and rounds once, i.e. exactly (x.float() - b.float()).to(dtype)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-32768, 32768, (1 << 20,), generator=g, dtype=torch.int32).to(torch.int16).view(dtype)
    b = torch.randint(-32768, 32768, (1 << 20,), generator=g, dtype=torch.int32).to(torch.int16).view(dtype)
    want = (x.float() - b.float()).to(dtype)
    got = x - b
    same = got.view(torch.int16) == want.view(torch.int16)
    assert bool((same | want.isnan() & got.isnan()).all())


# ---------------------------------------------------------------------------
# (f) non-finite protection


def _sentinel(flat):
    return torch.full((flat.total,), 5.0, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch"])
def test_nonfinite_source_raises_untouched(backend):
    flat, _, _ = _layout(seed=3)
    seg = flat.segments[2]
    flat.models[1, seg.offset + 3] = float("inf")
    flat.stats = None  # the sources changed
    table = F.build_table("task_arithmetic", flat, {"weight": [0.5, 0.5, 0.5]}, normalize=False)
    out = _sentinel(flat)
    with pytest.raises(F.NonFiniteMergeError) as err:
        F.apply(flat, table, out, backend=backend)
    assert err.value.segments == [2] and "layer.2.weight" in str(err.value)
    assert torch.equal(out, _sentinel(flat))


def test_overflow_raises_untouched():
    flat, _, _ = _layout(seed=4)
    table = F.build_table("task_arithmetic", flat, {"weight": [100.0, 100.0, 100.0]}, normalize=False,
                          lambda_=1e38)
    out = _sentinel(flat)
    with pytest.raises(F.NonFiniteMergeError):
        F.apply(flat, table, out, backend="torch")
    assert torch.equal(out, _sentinel(flat))


def test_unproven_but_finite_is_written():
    """A segment near the dtype's max fails the cheap bound; the dry run clears it."""
    flat, base, models = _layout(seed=5)
    seg = flat.segments[0]
    big = 3.38e38
    flat.base[seg.offset] = big
    for m in range(M):
        flat.models[m, seg.offset] = big  # delta 0 there
    base[0].view(-1)[0] = big
    for m in range(M):
        models[m][0].view(-1)[0] = big
    flat.stats = None
    params = {"weight": [0.3, 0.3, 0.3]}
    table = F.build_table("task_arithmetic", flat, params, normalize=False)
    assert F.finite.unproven_segments(flat, table, table.scales()) == [0]
    out = _sentinel(flat)
    F.apply(flat, table, out, backend="torch")
    assert torch.equal(_gather(flat, out), _expected(flat, base, models, "task_arithmetic", params,
                                                     normalize=False))


# ---------------------------------------------------------------------------
# (d) Triton kernels in the CPU interpreter (subprocess: TRITON_INTERPRET must be
# set before triton is imported)


def _triton_checks(device="cpu", block=64):
    """Triton vs torch path: every method, flat and per-tensor outputs, non-finite.

    Block 64 in the CPU interpreter, which runs every program in Python: SHAPES still give
    segments of several blocks, of exactly one, of one and a part, shorter and empty ones,
    in 12 programs per launch where block 32 needs 21."""
    from hotmerge.kernels import triton_merge as T

    # vector-aligned layout (every size a multiple of 8) and an unaligned one (_layout)
    g = torch.Generator().manual_seed(12)
    base = [torch.randn(s, generator=g).bfloat16() for s in [(8, 16), (32,), (4, 8)]]
    models = [[(b.float() + 0.05 * torch.randn(b.shape, generator=g)).bfloat16() for b in base]
              for _ in range(M)]
    aligned = F.FlatSources.from_tensors(models, base, names=["a", "b", "c"])
    if device != "cpu":
        aligned = F.FlatSources(aligned.models.to(device), aligned.segments, aligned.base.to(device))
    assert T._align(aligned, block) == T.VEC
    table = F.build_table("breadcrumbs_ties", aligned, {"weight": [0.5, 0.7, 0.2], "density": 0.6},
                          normalize=True)
    want = torch.zeros(aligned.total, dtype=torch.bfloat16, device=device)
    F.apply(aligned, table, want, backend="torch")
    got = torch.zeros_like(want)
    F.apply(aligned, table, got, backend="triton", block=block)
    assert torch.equal(got, want)
    views = [torch.zeros(s.numel, dtype=torch.bfloat16, device=device) for s in aligned.segments]
    F.apply(aligned, table, views, backend="triton", block=block)
    assert torch.equal(torch.cat(views), _gather(aligned, want))

    # fp16 sources
    half, _, _ = _layout(seed=13, dtype=torch.float16)
    if device != "cpu":
        half = F.FlatSources(half.models.to(device), half.segments, half.base.to(device))
    for method in ("ties", "dare_ties", "linear"):
        table = F.build_table(method, half, _candidate(method, seed=3), normalize=True, seed=2)
        want = torch.zeros(half.total, dtype=torch.float16, device=device)
        F.apply(half, table, want, backend="torch")
        got = torch.zeros_like(want)
        F.apply(half, table, got, backend="triton", block=block)
        assert torch.equal(got, want), (method, "fp16")

    flat, _, _ = _layout(seed=11)
    if device != "cpu":
        flat = F.FlatSources(flat.models.to(device), flat.segments, flat.base.to(device))
    for method in CLASSIC:
        for normalize in (False, True):
            params = _candidate(method, seed=1)
            table = F.build_table(method, flat, params, normalize=normalize,
                                  lambda_=0.9 if normalize else 1.0, seed=4)
            want = torch.zeros(flat.total, dtype=flat.dtype, device=device)
            F.apply(flat, table, want, backend="torch")
            got = torch.zeros_like(want)
            F.apply(flat, table, got, backend="triton", block=block)
            assert torch.equal(got, want), (method, normalize, int((got != want).sum()))
            views = [torch.zeros(s.numel, dtype=flat.dtype, device=device) for s in flat.segments]
            F.apply(flat, table, views, backend="triton", block=block)
            assert torch.equal(torch.cat(views), _gather(flat, want)), (method, "views")
    for method, params, with_base in FUNCTIONAL_CASES:
        layout = flat if with_base else F.FlatSources(flat.models, flat.segments)
        table = F.build_table(method, layout, params, normalize=False)
        want = torch.zeros(flat.total, dtype=flat.dtype, device=device)
        F.apply(layout, table, want, backend="torch")
        got = torch.zeros_like(want)
        F.apply(layout, table, got, backend="triton", block=block)
        assert torch.equal(got, want), (method, with_base, int((got != want).sum()))
    # same masks: dare with weight 1 on one model reproduces exactly which deltas survive
    table = F.build_table("dare_linear", flat, {"weight": [1, 0, 0], "density": 0.3}, normalize=False,
                          rescale=False, seed=9)
    a = torch.zeros(flat.total, dtype=flat.dtype, device=device)
    b = torch.zeros_like(a)
    F.apply(flat, table, a, backend="torch")
    F.apply(flat, table, b, backend="triton", block=block)
    assert torch.equal(a != flat.base, b != flat.base)
    # non-finite (and through the L1 reduction): raises, output untouched
    flat.models[0, flat.segments[5].offset] = float("nan")
    flat.stats = None
    table = F.build_table("dare_linear", flat, _candidate("dare_linear"), normalize=True)
    out = torch.full((flat.total,), 3.0, dtype=flat.dtype, device=device)
    with pytest.raises(F.NonFiniteMergeError) as err:
        F.apply(flat, table, out, backend="triton", block=block)
    assert err.value.segments == [5]
    assert bool((out == 3.0).all())


@pytest.mark.slow  # the Triton interpreter, in a subprocess: about a minute on two busy cores
def test_triton_interpreter_equals_torch():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    code = (
        "import runpy; ns = runpy.run_path('tests/test_kernels.py', run_name='kernels_triton');"
        "ns['_triton_checks'](); print('TRITON-OK')"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert "TRITON-OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


# ---------------------------------------------------------------------------
# (e) CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_cuda_equals_torch():
    _triton_checks(device="cuda", block=1024)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_cuda_large_equals_cpu_reference():
    """A larger layout: CUDA Triton vs the CPU torch path, bit for bit."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1024, 1024), (4096,), (333, 517)]
    base = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    models = [[(b.float() + 0.02 * torch.randn(b.shape, generator=g)).bfloat16() for b in base]
              for _ in range(3)]
    cpu = F.FlatSources.from_tensors(models, base, names=["a", "b", "c"])
    gpu = F.FlatSources(cpu.models.cuda(), cpu.segments, cpu.base.cuda())
    for method in CLASSIC:
        params = ({"t": 0.4, "pair": [0, 2]} if method == "slerp"
                  else {"weight": [0.5, 0.3, 0.8], "density": [0.4, 0.6, 0.5], "epsilon": 0.1})
        want = torch.zeros(cpu.total, dtype=torch.bfloat16)
        F.apply(cpu, F.build_table(method, cpu, params, normalize=True, seed=2), want, backend="torch")
        got = torch.zeros(cpu.total, dtype=torch.bfloat16, device="cuda")
        F.apply(gpu, F.build_table(method, gpu, params, normalize=True, seed=2), got, backend="triton")
        mism = int((got.cpu() != want).sum())
        # float64 L1/norm sums differ in order between devices: allow a handful of 1-ulp flips
        assert mism <= 16, (method, mism)
        assert ((got.cpu().float() - want.float()).abs() <= _ulp(want)).all(), method


def test_triton_kernels_compile_for_cuda():
    """Without a GPU: the kernels compile to PTX for sm_90 with 16-byte vector loads
    and stores (aligned layouts), no FMA contraction and correctly rounded division."""
    import re

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hotmerge.kernels import triton_merge as T

    sig = {
        "base_ptr": "*bf16", "src_ptr": "*bf16", "code_ptr": "*u8", "out_ptr": "*bf16",
        "addr_ptr": "*i64", "flag_ptr": "*i32", "blk_seg_ptr": "*i32", "blk_start_ptr": "*i64",
        "seg_off_ptr": "*i64", "seg_numel_ptr": "*i64", "seg_elem_ptr": "*i64",
        "ftab_ptr": "*fp32", "itab_ptr": "*i32", "div_ptr": "*fp32", "total": "i32", "lam": "fp32",
    }
    # what the launcher specialises for 16-byte aligned buffers and a total divisible by 16
    aligned_args = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 14)}
    for consts in (
        dict(M=3, COMBINE=True, SPARSE=0, CONSENSUS=False, NORMALIZE=True, NEARSWAP=False, IS_BF16=True,
             OUT_MODE=0, ALIGN=T.VEC, BLOCK=1024, OWN=0),
        dict(M=3, COMBINE=False, SPARSE=3, CONSENSUS=True, NORMALIZE=True, NEARSWAP=False, IS_BF16=True,
             OUT_MODE=1, ALIGN=T.VEC, BLOCK=1024, OWN=0),
        dict(M=3, COMBINE=False, SPARSE=0, CONSENSUS=False, NORMALIZE=False, NEARSWAP=True, IS_BF16=True,
             OUT_MODE=1, ALIGN=T.VEC, BLOCK=1024, OWN=0),
        # sce's branch (its float64 variance)
        dict(M=3, COMBINE=False, SPARSE=0, CONSENSUS=False, NORMALIZE=False, NEARSWAP=False, IS_BF16=True,
             OUT_MODE=1, ALIGN=T.VEC, BLOCK=1024, OWN=1),
    ):
        s = dict(sig, **{k: "constexpr" for k in consts})
        src = ASTSource(fn=T._merge_kernel, signature=s, constexprs=consts, attrs=aligned_args)
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": 4, "enable_fp_fusion": False})
        except RuntimeError as e:  # e.g. no ptxas in this Triton build
            pytest.skip(f"cannot compile for CUDA here: {e}")
        ptx = kernel.asm["ptx"]
        assert re.search(r"ld\.global(\.nc)?\.v4\.b32", ptx) and "st.global.v4.b32" in ptx
        assert "fma.rn.f32" not in ptx
        assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
    # the L1 reduction of DARE / DELLA's rescale
    sig = {
        "base_ptr": "*bf16", "src_ptr": "*bf16", "code_ptr": "*u8", "part_ptr": "*fp64",
        "blk_seg_ptr": "*i32", "blk_start_ptr": "*i64", "seg_off_ptr": "*i64", "seg_numel_ptr": "*i64",
        "seg_elem_ptr": "*i64", "itab_ptr": "*i32", "total": "i32",
    }
    consts = dict(M=3, SPARSE=2, IS_BF16=True, ALIGN=T.VEC, BLOCK=1024)
    src = ASTSource(fn=T._l1_kernel, signature=dict(sig, **{k: "constexpr" for k in consts}),
                    constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 10)})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
