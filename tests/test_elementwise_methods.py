"""sce, ram, ramplus_tl, arcee_fusion and the per-row model_stock and nuslerp: the reference
(kernels/reference.py) against mergekit's own merge functions on random tensors. The fused paths are held to the reference in
tests/test_kernels.py (FUNCTIONAL_CASES), whole merges to mergekit-yaml in
tests/test_merge_configs.py."""

import numpy as np
import pytest
import torch

from hotmerge.kernels import reference as R

pytest.importorskip("mergekit")


def _sources(shape, m=3, seed=0, unchanged=0.0):
    """Base ~ N(0,1) and m fine-tunes with deltas of varied size; `unchanged`: the share of
    each fine-tune's elements left equal to the base (RAM counts the models that moved)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).bfloat16()
    xs = []
    for _ in range(m):
        d = 0.02 * torch.randn(shape, generator=g) * torch.exp(0.7 * torch.randn(shape, generator=g))
        x = (base.float() + d).bfloat16()
        xs.append(torch.where(torch.rand(shape, generator=g) < unchanged, base, x))
    return base, xs


def _mergekit(method, base, xs, **params):
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    return registry.get(method).merge_group(TensorGroup.from_tensors([base, *xs], base_index=0), **params)


def _ulp(x):
    a = x.float().abs().clamp(min=2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_sce_variance_keys_are_torch_var(m):
    _, xs = _sources((256, 300), m=m, seed=m)
    deltas = [(x.float() - xs[0].float()).bfloat16() for x in xs[1:]] + [xs[0] - xs[-1]]
    theirs = torch.var(torch.stack(deltas), dim=0, unbiased=False)
    assert torch.equal(R.sce_var_keys(deltas).reshape(theirs.shape), R.magnitude_keys(theirs.reshape(-1)).reshape(theirs.shape))


@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.1, 0.0, 0.00001])
def test_sce_equals_mergekit(select_topk):
    """Within mergekit's bf16 rounding of each step (its product, sum and quotient of the
    merged delta, 2^-6 of |merged delta|), except where an element's variance equals the cut
    value (mergekit's topk picks among equal variances by position, hotmerge at random in the
    same expected count) or the selected deltas nearly cancel (the elected sign may flip)."""
    from mergekit.merge_methods.sce import sce_weight

    base, xs = _sources((96, 128), seed=2)
    got = R.sce_tensor(base, xs, select_topk, tensor_key=7)
    theirs = _mergekit("sce", base, xs, select_topk=select_topk)
    deltas = [(x.float() - base.float()).bfloat16() for x in xs]
    keys = R.sce_var_keys(deltas).reshape(base.shape)
    hist = R.SceHistogram.from_deltas(keys.reshape(-1), deltas)
    cut = R.sce_cut(hist, select_topk)
    at_cut = (keys == cut.lo) | (keys == cut.hi) if cut not in (R.KEEP_ALL, R.KEEP_NONE) else torch.zeros_like(keys, dtype=torch.bool)
    selected = R.range_keep(keys.reshape(-1), torch.zeros(keys.numel(), dtype=torch.int32), cut).reshape(base.shape)
    kept = torch.stack([torch.where(selected, d.float(), 0.0) for d in deltas])
    cancel = selected & (kept.sum(0).abs() <= 2.0 ** -6 * kept.abs().sum(0))
    merged = (theirs.float() - base.float()).abs()
    tolerance = _ulp(torch.maximum(got.float().abs(), theirs.float().abs())) + 2.0 ** -6 * merged
    ok = ~(at_cut | cancel)
    assert ((got.float() - theirs.float()).abs()[ok] <= tolerance[ok]).all()
    assert ok.float().mean() > 0.8
    if cut is R.KEEP_ALL:  # no tie: the weights are mergekit's, bit for bit
        ours = R.sce_weights(hist, cut, base.numel(), torch.bfloat16)
        assert ours.tolist() == sce_weight(torch.stack(deltas)).double().tolist()
    if cut is R.KEEP_NONE:
        assert torch.equal(got, base) and torch.equal(theirs, base)


def test_sce_cut_keeps_mergekits_count_in_expectation():
    base, xs = _sources((128, 128), seed=4)
    deltas = [(x.float() - base.float()).bfloat16() for x in xs]
    keys = R.sce_var_keys(deltas)
    hist = R.SceHistogram.from_deltas(keys, deltas)
    for select_topk in (0.3, 0.7):
        cut = R.sce_cut(hist, select_topk)
        k = int(int((keys != 0).sum()) * select_topk)
        assert cut.n_lo + cut.n_hi + int(((keys > cut.lo) & (keys < cut.hi)).sum()) == k


@pytest.mark.parametrize("epsilon", [1e-5, 0.01, 1.0])
def test_ram_and_ramplus_equal_mergekit_bit_for_bit(epsilon):
    base, xs = _sources((96, 128), m=4, seed=3, unchanged=0.4)
    assert torch.equal(R.merge_tensor("ram", base, xs, {"epsilon": epsilon}, normalize=False),
                       _mergekit("ram", base, xs, epsilon=epsilon))
    for r, alpha in ((0.1, 0.2), (0.7, 3.0)):
        got = R.merge_tensor("ramplus_tl", base, xs, {"r": r, "alpha": alpha, "epsilon": epsilon}, normalize=False)
        theirs = _mergekit("ramplus_tl", base, xs, r=r, alpha=alpha, epsilon=epsilon)
        assert theirs.dtype == torch.float32  # mergekit's RAM+ sums in float32; its output rounds once
        assert torch.equal(got, theirs.bfloat16()), (r, alpha)


def test_ram_threshold_compares_in_the_working_dtype():
    """mergekit's |delta| > 1e-5 compares bf16 values: a delta of bf16(1e-5) does not count."""
    eps = torch.tensor(1e-5).bfloat16()
    assert R.ram_threshold(1e-5, torch.bfloat16) == int(R.magnitude_keys(eps.reshape(1))[0])
    base = torch.zeros(4, dtype=torch.bfloat16)
    x = torch.tensor([float(eps), -float(eps), 2e-5, 0.0]).bfloat16()
    assert torch.equal(R.ram_tensor(base, [x], epsilon=1e-5), _mergekit("ram", base, [x], epsilon=1e-5))
    assert R.ram_tensor(base, [x], epsilon=1e-5).tolist()[:2] == [0.0, 0.0]


@pytest.mark.parametrize("shape", [(96, 128), (300,), (7, 1, 50)])
def test_arcee_fusion_equals_mergekit_bit_for_bit(shape):
    base, xs = _sources(shape, m=1, seed=5)
    got = R.fusion_tensor(base, xs[0])
    theirs = _mergekit("arcee_fusion", base, xs)
    assert torch.equal(got, theirs.bfloat16())
    assert 0 < int((got != base).sum()) < base.numel()  # the threshold selects


def test_arcee_fusion_samples_large_tensors_as_mergekit_does():
    """Over a million elements mergekit takes the quantiles from a random sample of its global
    RNG: hotmerge draws the same sample from its own generator, so the two agree exactly for
    the same random state, and in distribution otherwise."""
    base, xs = _sources((1025, 1000), m=1, seed=6)
    for state in (0, 1):
        torch.manual_seed(state)
        theirs = _mergekit("arcee_fusion", base, xs)
        keep = R.fusion_keep(base, xs[0], 1000, torch.Generator().manual_seed(state))
        assert torch.equal(keep.reshape(base.shape), theirs.bfloat16() != base)
    a = R.fusion_keep(base, xs[0], 1000, R.fusion_generator(3, 11))
    assert torch.equal(a, R.fusion_keep(base, xs[0], 1000, R.fusion_generator(3, 11)))  # reproducible


def _close_to_mergekit(ours, theirs, base, xs):
    """Within bf16 rounding of the terms mergekit sums in bf16."""
    a, b = ours.float(), theirs.float()
    terms = sum((x.float() - (0 if base is None else base.float())).abs() for x in xs)
    return bool(((a - b).abs() <= 2 * _ulp(torch.maximum(a.abs(), b.abs())) + 2.0 ** -6 * terms).all())


@pytest.mark.parametrize("shape", [(24,), (16, 40), (4, 6, 10)])
def test_model_stock_filter_wise_equals_mergekit(shape):
    base, xs = _sources(shape, m=3, seed=5)
    # rows whose deltas agree to different degrees, so that each row has its own t
    xs[1] = torch.where(torch.arange(shape[-1]) % 2 == 0, xs[0], xs[1])
    theirs = _mergekit("model_stock", base, xs, filter_wise=True)
    ours = R.stats_merge_rows("model_stock", base, xs, {})
    assert _close_to_mergekit(ours, theirs, base, xs)
    if len(shape) > 1:  # per row is not per tensor
        assert not _close_to_mergekit(R.stats_merge_tensor("model_stock", base, xs, {}), theirs, base, xs)


@pytest.mark.parametrize("shape", [(24,), (16, 40), (4, 6, 10)])
@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_per_row_equals_mergekit(shape, row_wise, with_base):
    base, xs = _sources(shape, m=2, seed=6)
    params = {"weight": [0.3, 0.9]}
    if not with_base:
        base, xs = None, [xs[0], (xs[0].float() + 0.5 * torch.randn(shape)).bfloat16()]
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import PerInputValues, TensorGroup

    group = TensorGroup.from_tensors(xs if base is None else [base, *xs], base_index=None if base is None else 0)
    weight = PerInputValues([(e.id, w) for e, w in zip(group.non_base, params["weight"])])
    theirs = registry.get("nuslerp").merge_group(group, weight=weight,
                                                  nuslerp_row_wise=row_wise, nuslerp_flatten=False)
    ours = R.stats_merge_rows("nuslerp", base, xs, params, columns=row_wise)
    assert ours.shape == theirs.shape and _close_to_mergekit(ours, theirs, base, xs)
    if len(shape) > 1:
        assert not torch.equal(ours, R.stats_merge_tensor("nuslerp", base, xs, params))


@pytest.mark.parametrize("shape", [(24,), (1, 9), (16, 40), (4, 6, 10), (2, 3, 4, 5)])
@pytest.mark.parametrize("columns", [False, True])
def test_row_ids_name_the_rows_mergekit_takes(shape, columns):
    """reference.row_ids gives each element (by its index in the whole tensor) the row of
    reference._rows that holds it: the per-row methods' engine finds rows from indices alone."""
    ids = torch.arange(int(np.prod(shape))).reshape(shape)
    rows = R._rows(ids, columns)
    want = torch.empty(ids.numel(), dtype=torch.int64)
    for r in range(rows.shape[0]):
        want[rows[r]] = r
    assert torch.equal(R.row_ids(torch.arange(ids.numel()), shape, columns), want)
    assert R.row_count(shape, columns) == rows.shape[0]


@pytest.mark.parametrize("method, params, with_base, columns", [
    ("model_stock", {"filter_wise": 1.0}, True, False),
    ("nuslerp", {"weight": [0.3, 0.8, 0.0], "active": [1, 1, 0], "nuslerp_flatten": 0.0}, True, False),
    ("nuslerp", {"weight": [0.3, 0.8, 0.0], "active": [1, 1, 0], "nuslerp_flatten": 0.0,
                 "nuslerp_row_wise": 1.0}, True, True),
    ("nuslerp", {"weight": [0.0, 0.3, 0.8], "active": [0, 1, 1], "nuslerp_flatten": 0.0,
                 "nuslerp_row_wise": 1.0}, False, True),
])
def test_per_row_engine_equals_reference(method, params, with_base, columns):
    """model_stock with filter_wise and nuslerp with nuslerp_flatten false in the engine: each
    element's coefficients from its row's Gram matrix, bit-equal to reference.stats_merge_rows,
    for a second candidate too (the row statistics are kept, not stale)."""
    from hotmerge import kernels as F

    shapes = [(24,), (16, 40), (4, 6, 10), (1, 9)]
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    models = [[(b.float() + 0.05 * torch.randn(b.shape, generator=g)).bfloat16() for b in base] for _ in range(3)]
    flat = F.FlatSources.from_tensors(models, base if with_base else None, [f"t{i}" for i in range(len(shapes))])
    active = [int(i) for i in np.flatnonzero(params.get("active", [1, 1, 1]))]
    for scale in (1.0, 0.5):
        p = dict(params, weight=[scale * w for w in params["weight"]]) if "weight" in params else params
        outs = [torch.zeros(s.numel, dtype=flat.dtype) for s in flat.segments]
        F.apply(flat, F.build_table(method, flat, p, normalize=True), outs)
        for j, shape in enumerate(shapes):
            w = {"weight": [p["weight"][i] for i in active]} if "weight" in p else {}
            want = R.stats_merge_rows(method, base[j] if with_base else None, [models[i][j] for i in active], w,
                                      columns=columns)
            assert torch.equal(outs[j].view(shape), want), (method, shape, scale)
