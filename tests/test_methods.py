"""The method registry (hotmerge/kernels/methods.py) says what mergekit 0.1.5 says of each method."""

import pytest

from hotmerge.kernels.methods import METHODS, NON_BASE, SHARED, SUPPORTED_METHODS, Sparsification, get_method

mergekit_methods = pytest.importorskip("mergekit.merge_methods")
mergekit_registry = pytest.importorskip("mergekit.merge_methods.registry")


def test_every_mergekit_method_is_registered():
    """A method that mergekit adds fails here, by name, until it has an entry."""
    theirs = [m.spec.name for m in mergekit_registry.registered_methods()]
    missing = [name for name in theirs if name not in METHODS]
    assert not missing, f"mergekit has merge methods the registry lacks: {', '.join(missing)}"
    assert sorted(METHODS) == sorted(theirs)


@pytest.mark.parametrize("name", list(METHODS))
def test_registry_equals_mergekit(name):
    ours = METHODS[name]
    theirs = mergekit_methods.get(name)
    spec = theirs.spec
    assert ours.pretty_name == spec.pretty_name
    assert ours.paper == (spec.reference_url or "")

    def described(params):
        return {p.name: (p.scope, None if p.default is None else p.default) for p in params}

    def mergekit_described(params):
        return {p.name: (p.scope.value, None if p.required else p.default) for p in params}

    assert described(ours.global_params) == mergekit_described(spec.shared_parameters)
    assert described(ours.tensor_params) == mergekit_described(spec.input_parameters)
    for p in ours.tensor_params + ours.global_params:
        theirs_p = next(q for q in spec.parameters if q.name == p.name)
        assert p.required == theirs_p.required
        if p.default is not None:  # the same type: an int default stays an int (karcher's max_iter)
            assert type(p.default) is type(theirs_p.default)
    c = spec.contract
    assert (ours.contract.base, ours.contract.min_inputs, ours.contract.max_inputs, ours.contract.min_non_base,
            ours.contract.max_non_base) == (c.base.value, c.min_inputs, c.max_inputs, c.min_non_base,
                                             c.max_non_base)
    # a base is required exactly where mergekit requires one (slerp: one of its two inputs)
    assert ours.needs_base == (c.base.value == "required" and name != "slerp")
    if hasattr(theirs, "sparsification_method"):
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
    elif ours.engine == "task":
        assert name not in METHOD_PARAM_MAPS
        assert set(ours.genes) == {"weight", "density"}
        assert ours.evolve_normalize == ours.consensus  # the added methods: on with sign consensus
    else:
        assert name not in METHOD_PARAM_MAPS
        assert not ours.evolve_normalize
    assert set(ours.genes) <= {p.name for p in ours.tensor_params + ours.global_params}
    # every gene a search can move is a number (no flag, no iteration count)
    for p in ours.tensor_params + ours.global_params:
        if p.name in ours.genes:
            assert p.default is None or type(p.default) is float


@pytest.mark.parametrize("name, genes, scope", [
    ("nuslerp", ("weight",), NON_BASE), ("multislerp", ("weight",), NON_BASE), ("nearswap", ("t",), SHARED),
    ("sce", ("select_topk",), SHARED), ("ramplus_tl", ("r", "alpha"), SHARED),
    ("model_stock", (), None), ("karcher", (), None), ("arcee_fusion", (), None), ("passthrough", (), None),
])
def test_what_evolve_searches_for_the_functional_methods(name, genes, scope):
    spec = METHODS[name]
    assert spec.genes == genes and spec.searchable == bool(genes)
    if genes:
        assert spec.gene_scope == scope


def test_resident_statistics_follow_the_sparsification():
    for name, spec in METHODS.items():
        assert spec.needs_rank_codes == (spec.sparsification is Sparsification.della_magprune)
        # della's rank codes, arcee_fusion's keep bits: one byte per parameter and model
        assert spec.rank_code_bytes_per_parameter == (1 if spec.needs_rank_codes or name == "arcee_fusion" else 0)
        assert spec.needs_histograms == (spec.sparsification in (Sparsification.magnitude,
                                                                  Sparsification.magnitude_outliers))


def test_unsupported_methods_are_refused_in_one_line_naming_them():
    for name, spec in METHODS.items():
        if name in SUPPORTED_METHODS:
            spec.refuse_unless_supported()
            continue
        with pytest.raises(ValueError, match=f"merge method {name} is not supported: ") as e:
            spec.refuse_unless_supported()
        assert "\n" not in str(e.value)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="use one of linear, slerp, task_arithmetic"):
        get_method("model_soup")
