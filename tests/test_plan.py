"""`hotmerge plan` counts the load-time statistics the kernels keep (kernels/stats.py)."""

import pytest
import torch

from hotmerge import kernels as F
from hotmerge.kernels.methods import METHODS
from hotmerge.models.plan import FLOAT64, statistics_rows

SHAPES = [(16, 24), (40,), (3, 5)]


def _layout(n_models: int, with_base: bool):
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g).bfloat16() for s in SHAPES]
    models = [[(b.float() + 0.05 * torch.randn(b.shape, generator=g)).bfloat16() for b in base]
              for _ in range(n_models)]
    return F.FlatSources.from_tensors(models, base if with_base else None)


def _bytes(*arrays) -> int:
    return sum(a.nbytes for a in arrays if a is not None)


@pytest.mark.parametrize("method, with_base", [
    ("ties", True), ("della", True), ("slerp", False), ("model_stock", True), ("multislerp", True),
    ("karcher", False), ("nearswap", True), ("linear", False),
])
def test_plan_counts_what_the_statistics_hold(method, with_base):
    spec, n = METHODS[method], 3
    flat = _layout(n, with_base)
    st = flat.compute_stats(della=spec.needs_rank_codes, slerp=spec.needs_slerp_constants)
    parameters = sum(s.numel for s in flat.segments)
    rows = dict(statistics_rows(spec, n, len(SHAPES), parameters, with_base=with_base))
    constants = _bytes(st.norms, st.dots, st.delta_dots)
    assert rows.get("statistics: norms and dot products (cached)", 0) == constants
    assert (constants > 0) == spec.needs_slerp_constants
    histograms = sum(_bytes(h.keys, h.cum, h.cum_l1) for per_model in st.hist or [] for h in per_model)
    assert 0 < histograms <= rows["statistics: magnitude histograms (cached)"] if with_base else histograms == 0
    codes = 0 if st.rank_codes is None else st.rank_codes[:, :parameters].numel()
    assert rows.get("statistics: della rank codes (cached)", 0) == codes


OWN_KERNELS = {  # method: (models besides the base, parameters, the plan's row of what it keeps)
    "sce": (3, {"select_topk": 0.5}, "statistics: sce variance-key histograms"),
    "ramplus_tl": (3, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, "statistics: ramplus_tl shared and unique counts"),
    "arcee_fusion": (1, {}, "statistics: arcee_fusion keep codes"),
    "ram": (3, {"epsilon": 1e-5}, None),
}


@pytest.mark.parametrize("method", sorted(OWN_KERNELS))
def test_plan_counts_what_the_own_kernels_keep(method):
    """sce, ram, ramplus_tl and arcee_fusion keep their statistics beside the table (built with
    the first table): the plan counts each, and only what they keep."""
    spec = METHODS[method]
    n, params, row = OWN_KERNELS[method]
    flat = _layout(n, True)
    F.build_table(method, flat, params, normalize=False)
    parameters = sum(s.numel for s in flat.segments)
    rows = dict(statistics_rows(spec, n, len(SHAPES), parameters, with_base=True))
    kept = list(flat.stats.extras.values())
    if method == "sce":  # one list of the tensors' histograms
        (hists,) = kept
        assert 0 < sum(_bytes(h.keys, h.cum, h.sq) for h in hists) <= rows[row]
    elif method == "ramplus_tl":  # one list of the tensors' counts
        (counts,) = kept
        assert sum(FLOAT64 * (len(shared) + len(unique)) for shared, unique in counts) == rows[row]
    elif method == "arcee_fusion":
        (codes,) = kept
        assert codes[:, :parameters].numel() == rows[row]
    else:
        assert not kept
    assert [what for what in rows if "histograms (cached)" not in what] == ([] if row is None else [row])
