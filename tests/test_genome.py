"""Genome parity with mergekit 0.1.5: x0, emitted merge configs, and decoded recipes.

The oracle is mergekit itself: `ModelGenome.genotype_merge_config` for the configs,
mergekit's MergePlanner (which resolves filters, gradients and defaults for every
tensor) for the recipes, and a few real merges for end-to-end agreement.
"""

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("mergekit")

from mergekit.common import ModelReference  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hotmerge.config.evolve import GenomeConfig  # noqa: E402
from hotmerge.config.genome import (  # noqa: E402
    FIXED_PARAMS,
    METHOD_PARAMS,
    Genome,
    is_pre_weight,
)

try:
    from tests.tinymodels import make_llama_family
except ImportError:
    from tinymodels import make_llama_family

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    base, models = make_llama_family(tmp_path_factory.mktemp("family"), n_models=3, seed=0)
    return base, models


# Genome shapes: (name, method, base placement, extra genome keys).
# base placement: "out" = base_model not in models, "in" = base_model listed first,
# None = no base_model.
CASES = [
    ("linear-g0", "linear", None, {}),
    ("linear-g2-filters", "linear", None, {"layer_granularity": 2, "filters": ["self_attn", "mlp"]}),
    ("linear-smooth-g1", "linear", None, {"layer_granularity": 1, "smooth": True, "normalize": False}),
    ("linear-base-in-neg", "linear", "in", {"layer_granularity": 2, "allow_negative_weights": True}),
    ("ta-g0", "task_arithmetic", "out", {}),
    ("ta-g1-filters", "task_arithmetic", "out", {"layer_granularity": 1, "filters": ["mlp"]}),
    (
        "ta-smooth-g1-filters",
        "task_arithmetic",
        "out",
        {"layer_granularity": 1, "smooth": True, "filters": ["q_proj", "mlp"]},
    ),
    ("ta-base-in-neg-norm", "task_arithmetic", "in", {"allow_negative_weights": True, "normalize": True}),
    ("ties-g2-filters", "ties", "out", {"layer_granularity": 2, "filters": ["self_attn", "mlp.up"]}),
    ("ties-smooth-g2", "ties", "out", {"layer_granularity": 2, "smooth": True}),
    ("ties-g1-neg-nonorm", "ties", "in", {"layer_granularity": 1, "allow_negative_weights": True, "normalize": False}),
    ("dare_ties-g0", "dare_ties", "out", {}),
    ("dare_ties-g4", "dare_ties", "out", {"layer_granularity": 4}),
    (
        "dare_ties-smooth-g1-filters-neg",
        "dare_ties",
        "in",
        {"layer_granularity": 1, "smooth": True, "filters": ["norm"], "allow_negative_weights": True},
    ),
    ("slerp-g0", "slerp", None, {}),
    ("slerp-g1", "slerp", None, {"layer_granularity": 1}),
    ("slerp-g2", "slerp", None, {"layer_granularity": 2}),
]
EXTRA_CASES = [
    ("dare_linear-g2", "dare_linear", "out", {"layer_granularity": 2}),
    ("breadcrumbs-g1-filters", "breadcrumbs", "out", {"layer_granularity": 1, "filters": ["mlp"]}),
    ("breadcrumbs_ties-smooth", "breadcrumbs_ties", "in", {"layer_granularity": 2, "smooth": True}),
    ("della-g2", "della", "out", {"layer_granularity": 2, "filters": ["self_attn"]}),
    ("della_linear-smooth", "della_linear", "out", {"layer_granularity": 1, "smooth": True}),
]


def genome_dict(family, method, base, extra):
    base_path, models = family
    d = {"models": list(models), "merge_method": method, **extra}
    if base == "out":
        d["base_model"] = base_path
    elif base == "in":
        d["models"] = [base_path] + list(models)
        d["base_model"] = base_path
    return d


def random_genotypes(genome, n=4, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(0.3, 0.6, genome.size) for _ in range(n)]
    # ties between genes (slerp top-2) and exact zeros/ones
    xs.append(np.round(rng.normal(0.3, 0.6, genome.size), 1))
    return xs


def ours(family, method, base, extra):
    d = genome_dict(family, method, base, extra)
    return Genome(GenomeConfig.model_validate(d), NUM_LAYERS), d


def theirs(d):
    return ModelGenome(ModelGenomeDefinition.model_validate(d))


def dump(cfg: MergeConfiguration) -> dict:
    return cfg.model_dump(exclude_none=True, mode="json")


# -- shape and x0 -------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_shape_and_x0_match_mergekit(family, case):
    _, method, base, extra = case
    g, d = ours(family, method, base, extra)
    ref = theirs(d).initial_genotype()
    assert g.shape == tuple(ref.shape)
    assert g.size == ref.numel()
    x0 = g.x0()
    assert x0.dtype == np.float64 and x0.shape == (g.size,)
    np.testing.assert_array_equal(x0, ref.view(-1).numpy().astype(np.float64))


@pytest.mark.parametrize("case", EXTRA_CASES, ids=[c[0] for c in EXTRA_CASES])
def test_extra_methods_shape(family, case):
    _, method, base, extra = case
    g, d = ours(family, method, base, extra)
    groups = NUM_LAYERS // extra.get("layer_granularity", 0) if extra.get("layer_granularity") else 1
    assert g.shape == (groups, len(d["models"]), len(extra.get("filters", [])) + 1, 2)
    assert METHOD_PARAMS[method] == ("weight", "density")
    x = g.x0().reshape(g.shape)
    assert np.all(x[..., 0] == np.float32(1 / len(d["models"]))) and np.all(x[..., 1] == 1)


def test_random_x0_in_unit_interval(family):
    g, _ = ours(family, "ties", "out", {"layer_granularity": 2})
    x = g.x0(random=True, seed=3)
    assert x.shape == (g.size,) and np.all((x >= 0) & (x < 1))
    np.testing.assert_array_equal(x, g.x0(random=True, seed=3))


# -- emitted configs ----------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_merge_config_matches_mergekit(family, case):
    _, method, base, extra = case
    g, d = ours(family, method, base, extra)
    ref = theirs(d)
    for x in random_genotypes(g) + [g.x0()]:
        assert g.to_mergekit_config(x) == dump(ref.genotype_merge_config(x))
        # also for the (G, M, S, P) form
        assert g.to_mergekit_config(x.reshape(g.shape)) == dump(ref.genotype_merge_config(x))


def test_slerp_tokenizer_source_matches_mergekit(family):
    g, d = ours(family, "slerp", None, {"layer_granularity": 2, "tokenizer_source": "base"})
    for x in random_genotypes(g):
        assert g.to_mergekit_config(x) == dump(theirs(d).genotype_merge_config(x))


@pytest.mark.parametrize("case", EXTRA_CASES[:3], ids=[c[0] for c in EXTRA_CASES[:3]])
def test_extra_methods_mirror_ties_structure(family, case):
    # mergekit-evolve does not know these methods; their configs have exactly the
    # structure of a ties config with the same genes.
    _, method, base, extra = case
    extra = {**extra, "normalize": True}
    g, d = ours(family, method, base, extra)
    ref = theirs({**d, "merge_method": "ties"})
    for x in random_genotypes(g):
        expected = dump(ref.genotype_merge_config(x))
        expected["merge_method"] = method
        assert g.to_mergekit_config(x) == expected


def test_della_density_stays_in_valid_range(family):
    g, _ = ours(family, "della", "out", {"layer_granularity": 2})
    eps = FIXED_PARAMS["della"]["epsilon"]
    x = np.random.default_rng(1).normal(0.0, 2.0, g.size)
    x.reshape(g.shape)[..., 1].flat[:3] = [0.0, 1.0, 0.05]
    dens = g.param_values(x)["density"]
    assert np.all(dens > eps) and np.all(dens < 1 - eps)


def test_config_is_plain_yaml_and_mergekit_accepts_it(family):
    g, _ = ours(family, "ties", "out", {"layer_granularity": 2, "filters": ["mlp"], "smooth": True})
    cfg = g.to_mergekit_config(random_genotypes(g)[0])
    text = yaml.safe_dump(cfg)  # fails on numpy scalars or other non-plain types
    assert yaml.safe_load(text) == cfg
    MergeConfiguration.model_validate(yaml.safe_load(text))
    assert cfg["dtype"] == "bfloat16" and cfg["parameters"]["int8_mask"] is True


def test_model_paths_rename(family):
    base_path, models = family
    g, _ = ours(family, "ties", "out", {})
    cfg = g.to_mergekit_config(g.x0(), model_paths=["a", "b", "c"])
    assert [s["model"] for s in cfg["slices"][0]["sources"]] == ["a", "b", "c", base_path]
    cfg = g.to_mergekit_config(g.x0(), model_paths={base_path: "base", models[0]: "a"})
    assert cfg["base_model"] == "base"
    assert [s["model"] for s in cfg["slices"][0]["sources"]] == ["a", models[1], models[2], "base"]


def test_bad_genotype_size(family):
    g, _ = ours(family, "ties", "out", {})
    with pytest.raises(ValueError):
        g.decode(np.zeros(g.size + 1))


# -- decoded recipes against mergekit's planner -------------------------------


def planned_tensors(merge_config: dict):
    """mergekit's per-tensor merge tasks (resolved parameters) for a merge config."""
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config, get_architecture_info
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    cfg = MergeConfiguration.model_validate(merge_config)
    options = MergeOptions()
    arch = get_architecture_info(cfg, options)
    LoaderCache().setup(options)
    planner = MergePlanner(cfg, arch, options, _model_out_config(cfg, arch))
    planner._plan()
    return [(w.name, task) for w, task in planner._tensors]


def check_recipe_against_plan(genome, x):
    recipe = genome.decode(x)
    tasks = planned_tensors(genome.to_mergekit_config(x))
    assert {name for name, _ in tasks} >= {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.3.mlp.down_proj.weight",
    }
    refs = [ModelReference.model_validate(p) for p in genome.models]
    for name, task in tasks:
        r = recipe.tensor(name)
        shared = dict(task.parameters.items())
        if genome.method == "slerp":
            assert shared["t"] == r.t, name
            assert task.base_model == refs[r.base], name
            assert set(task.model_order) == {refs[r.base], refs[r.other]}, name
            continue
        assert shared["normalize"] == recipe.normalize, name
        if genome.method != "linear":
            assert shared["rescale"] == recipe.rescale, name
            assert shared["int8_mask"] is True and shared["lambda"] == 1.0
        for i, ref in enumerate(refs):
            resolved = dict(task.input_parameters[ref].items())
            if not r.active[i]:
                assert resolved == {}, name  # the base model gets no per-model params
                assert r.params["weight"][i] == 0.0
                continue
            # task_arithmetic also resolves density (default 1.0), which it never uses
            unused = {"density": 1.0} if genome.method == "task_arithmetic" else {}
            assert set(resolved) == set(r.params) | set(unused), name
            for p, v in resolved.items():
                assert v == (unused[p] if p in unused else r.params[p][i]), (name, p, i)


@pytest.mark.parametrize("case", CASES + EXTRA_CASES, ids=[c[0] for c in CASES + EXTRA_CASES])
def test_decode_matches_mergekit_planner(family, case):
    _, method, base, extra = case
    g, _ = ours(family, method, base, extra)
    for x in random_genotypes(g, n=2):
        check_recipe_against_plan(g, x)


def test_pre_post_and_smooth_semantics(family):
    # The rules the planner check relies on, spelt out on a small example.
    g, _ = ours(family, "linear", None, {"layer_granularity": 1, "filters": ["mlp"]})
    x = np.arange(g.size, dtype=np.float64).reshape(g.shape)  # (4 groups, 3 models, 2 sets, 1)
    r = g.decode(x)
    assert r.tensor("model.embed_tokens.weight").location.group == 0
    assert r.tensor("model.norm.weight").location.group == 3
    assert r.tensor("lm_head.weight").location.group == 3
    assert r.tensor("model.layers.2.mlp.up_proj.weight").location == r.locate("model.layers.2.mlp.x")
    np.testing.assert_array_equal(r.params("model.layers.2.mlp.up_proj.weight")["weight"], x[2, :, 0, 0])
    np.testing.assert_array_equal(r.params("model.layers.2.self_attn.q_proj.weight")["weight"], x[2, :, 1, 0])
    assert is_pre_weight("model.embed_tokens.weight") and not is_pre_weight("lm_head.weight")

    smooth, _ = ours(family, "linear", None, {"layer_granularity": 2, "smooth": True})
    x = np.array([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]]).reshape(smooth.shape)  # G=2 anchors
    r = smooth.decode(x)
    # layer i sits at t = i / 3 between the two anchors; pre and post weights at t = 0
    np.testing.assert_allclose(r.params("model.layers.1.mlp.up_proj.weight")["weight"], [1 + 4 / 3, 2 + 4 / 3, 3 + 4 / 3])
    np.testing.assert_array_equal(r.params("model.layers.3.mlp.up_proj.weight")["weight"], [5, 6, 7])
    np.testing.assert_array_equal(r.params("lm_head.weight")["weight"], [1, 2, 3])
    np.testing.assert_array_equal(r.params("model.embed_tokens.weight")["weight"], [1, 2, 3])


# -- end to end: real mergekit merges -------------------------------------------


def mergekit_merge(merge_config: dict, out_dir) -> dict:
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(merge_config)
    run_merge(cfg, str(out_dir), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return load_file(str(out_dir / "model.safetensors"))


def merge_with_recipe(genome, recipe, sources: list[dict], base: dict, name: str) -> torch.Tensor:
    """Apply mergekit's merge kernel to one tensor with the parameters decode() gave."""
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    method = merge_methods.get(genome.method)
    r = recipe.tensor(name)
    if genome.method == "slerp":
        group = TensorGroup.from_tensors(
            [sources[r.base][name], sources[r.other][name]], base_index=0
        )
        return method([group], parameters={"t": r.t})[0]
    ids = list(range(len(genome.models)))
    tensors = [s[name] for s in sources]
    base_index = recipe.base_index
    if genome.method != "linear" and base_index is None:
        ids.append("base")
        tensors.append(base[name])
        base_index = len(tensors) - 1
    group = TensorGroup.from_tensors(
        tensors, ids=ids, base_index=None if genome.method == "linear" else base_index
    )
    params = {"normalize": recipe.normalize}
    if genome.method != "linear":
        params.update(int8_mask=True, rescale=recipe.rescale)
    for p, v in r.params.items():
        params[p] = {i: float(v[i]) for i in range(len(genome.models)) if r.active[i]}
    return method([group], parameters=params)[0]


@pytest.mark.parametrize(
    "case",
    [
        ("ties", "out", {"layer_granularity": 2, "filters": ["self_attn", "mlp.up"]}),
        ("task_arithmetic", "in", {"layer_granularity": 1, "smooth": True, "filters": ["mlp"]}),
        ("linear", None, {"layer_granularity": 2, "smooth": True, "allow_negative_weights": True}),
        ("slerp", None, {"layer_granularity": 2}),
    ],
    ids=["ties", "task_arithmetic-smooth", "linear-smooth", "slerp"],
)
def test_mergekit_merge_equals_recipe(family, tmp_path, case):
    method, base, extra = case
    g, _ = ours(family, method, base, extra)
    x = random_genotypes(g, n=1, seed=7)[0]
    merged = mergekit_merge(g.to_mergekit_config(x), tmp_path / "out")
    recipe = g.decode(x)
    sources = [load_file(f"{p}/model.safetensors") for p in g.models]
    base_tensors = load_file(f"{family[0]}/model.safetensors")
    for name in merged:
        expected = merge_with_recipe(g, recipe, sources, base_tensors, name)
        assert torch.equal(merged[name], expected.to(merged[name].dtype)), name


def test_genome_module_does_not_import_the_config_schema():
    """config/evolve.py imports the genome; the genome must not import it back."""
    import subprocess
    import sys

    code = ("import sys, hotmerge.config.genome; "
            "sys.exit('hotmerge.config.evolve' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- genes of mergekit's functional methods ------------------------------------
# (method, base placement, extra genome keys, models used): nearswap's t is one gene per
# (layer group, filter set); nuslerp's and multislerp's weight one per model as well.
FUNCTIONAL_CASES = [
    ("nearswap-g2-filters", "nearswap", "out", {"layer_granularity": 2, "filters": ["mlp"]}, 1),
    ("nearswap-smooth-filters", "nearswap", "out", {"layer_granularity": 1, "smooth": True,
                                                    "filters": ["self_attn"]}, 1),
    ("nuslerp-base-g2", "nuslerp", "out", {"layer_granularity": 2}, 2),
    ("nuslerp-no-base-filters", "nuslerp", None, {"filters": ["mlp"]}, 2),
    ("multislerp-smooth", "multislerp", "out", {"layer_granularity": 2, "smooth": True}, 3),
    ("sce-g2-filters", "sce", "out", {"layer_granularity": 2, "filters": ["mlp"]}, 3),
    ("ramplus_tl-smooth", "ramplus_tl", "out", {"layer_granularity": 1, "smooth": True}, 2),
]


@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=[c[0] for c in FUNCTIONAL_CASES])
def test_functional_genes_decode_as_mergekit_plans_them(family, case):
    """Each gene lands where mergekit's planner reads it: shared genes as the merge's
    parameters of every tensor of their layer group and filter set, per-model genes as
    that model's; the recipe the engine applies holds the same values."""
    _, method, base, extra, n = case
    base_path, models = family
    g = Genome(GenomeConfig.model_validate(genome_dict((base_path, models[:n]), method, base, extra)), NUM_LAYERS)
    shared = method in ("nearswap", "sce", "ramplus_tl")
    assert g.shape[1] == (1 if shared else n)
    x = random_genotypes(g, n=1, seed=11)[0]
    recipe = g.decode(x)
    refs = [ModelReference.model_validate(p) for p in g.models]
    tasks = planned_tensors(g.to_mergekit_config(x))
    seen = set()
    for name, task in tasks:
        r = recipe.tensor(name)
        assert r.params["active"].tolist() == [1.0] * n, name
        for gene in g.param_names:
            if shared:
                value = task.parameters[gene]
                assert r.params[gene].tolist() == [value] * n, (name, gene)
                seen.add(value)
            else:
                for i, ref in enumerate(refs):
                    assert task.input_parameters[ref][gene] == r.params[gene][i], (name, gene, i)
    if shared:  # every gene reached some tensor (smooth: interpolated between them)
        assert len(seen) >= g.size


def test_shared_genes_start_at_the_registry_values(family):
    base_path, models = family
    g = Genome(GenomeConfig.model_validate(genome_dict((base_path, models[:1]), "nearswap", "out", {})),
               NUM_LAYERS)
    assert g.shape == (1, 1, 1, 1)
    np.testing.assert_array_equal(g.x0(), [np.float32(1e-3)])
    g = Genome(GenomeConfig.model_validate(genome_dict(family, "ramplus_tl", "out", {"layer_granularity": 2})),
               NUM_LAYERS)
    assert g.shape == (2, 1, 1, 2)  # r and alpha from mergekit's defaults
    np.testing.assert_array_equal(g.x0().reshape(g.shape)[0, 0, 0], [np.float32(0.1), np.float32(0.2)])


@pytest.mark.parametrize("method", ["model_stock", "karcher", "passthrough", "ram", "arcee_fusion"])
def test_methods_with_nothing_to_search_are_refused_by_the_genome(family, method):
    base_path, models = family
    with pytest.raises(ValueError, match=f"{method} has no parameter for evolve to search"):
        GenomeConfig.model_validate(genome_dict(family, method, "out", {}))
