"""The method registry (hotmerge/kernels/methods.py) says what mergekit 0.1.5 says of each method."""

import pytest

from hotmerge.kernels.methods import METHODS, Sparsification, get_method

mergekit_methods = pytest.importorskip("mergekit.merge_methods")


@pytest.mark.parametrize("name", list(METHODS))
def test_registry_equals_mergekit(name):
    ours = METHODS[name]
    theirs = mergekit_methods.get(name)
    spec = theirs.spec
    assert ours.pretty_name == spec.pretty_name
    if spec.reference_url:
        assert ours.paper == spec.reference_url

    def described(params):
        return {p.name: (None if p.required else p.default) for p in params}

    shared = [p for p in spec.parameters if p.scope.value == "shared"]
    per_model = [p for p in spec.parameters if p.scope.value != "shared"]
    assert described(ours.global_params) == {
        p.name: (p.default if isinstance(p.default, (bool, int, float)) else None) for p in shared}
    assert described(ours.tensor_params) == {
        p.name: (p.default if isinstance(p.default, (bool, int, float)) else None) for p in per_model}
    # a base is required exactly by the task-arithmetic family
    assert ours.needs_base == (spec.contract.base.value == "required" and name != "slerp")
    if not ours.combine:
        assert ours.sparsify == (theirs.sparsification_method.value if theirs.sparsification_method else None)
        assert ours.consensus == (theirs.consensus_method is not None)
        assert ours.default_normalize == theirs.default_normalize
        assert ours.default_rescale == theirs.default_rescale


@pytest.mark.parametrize("name", list(METHODS))
def test_genes_and_evolve_defaults_equal_mergekit_evolve(name):
    from mergekit.evo.genome import METHOD_PARAM_MAPS

    ours = METHODS[name]
    if ours.evolve_native:
        assert list(ours.genes) == METHOD_PARAM_MAPS[name]
        # mergekit-evolve: normalize = merge_method in ["ties", "dare_ties", "linear"] when unset
        assert ours.evolve_normalize == (name in ("ties", "dare_ties", "linear"))
    else:
        assert name not in METHOD_PARAM_MAPS
        assert set(ours.genes) == {"weight", "density"}
        assert ours.evolve_normalize == ours.consensus  # the added methods: on with sign consensus
    assert set(ours.genes) <= {p.name for p in ours.tensor_params + ours.global_params}


def test_resident_statistics_follow_the_sparsification():
    for spec in METHODS.values():
        assert spec.needs_rank_codes == (spec.sparsification is Sparsification.della_magprune)
        assert spec.rank_code_bytes_per_parameter == (1 if spec.needs_rank_codes else 0)
        assert spec.needs_histograms == (spec.sparsification in (Sparsification.magnitude,
                                                                  Sparsification.magnitude_outliers))


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="use one of linear, slerp, task_arithmetic"):
        get_method("model_stock")
