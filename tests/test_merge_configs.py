"""Plain mergekit merge configs (the files `mergekit-yaml` takes), every parameter away from
its default: hotmerge's export equals mergekit 0.1.5's merge of the same file, or refuses
with one line that names what it cannot honour."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from hotmerge.errors import ConfigError
from hotmerge.run.export import export_merge
from hotmerge.config.merge import read_merge_config
from parity import ULPS, assert_equal_to_mergekit


def _family(toy_family):
    return str(toy_family.base), [str(p) for p in toy_family.experts]


def _models(experts, params):
    return [{"model": m, "parameters": p} for m, p in zip(experts, params)]


def _cases(base, ex):
    """name -> merge config; each sets parameters away from mergekit's defaults."""
    return {
        "ties-lambda": {
            "merge_method": "ties", "base_model": base, "dtype": "bfloat16",
            "parameters": {"lambda": 0.5},
            "models": _models(ex, [{"weight": 0.7, "density": 0.6}, {"weight": 0.5, "density": 0.4},
                                   {"weight": 0.9, "density": 0.8}])},
        "ties-global-weight-no-normalize": {
            "merge_method": "ties", "base_model": base, "dtype": "bfloat16",
            "parameters": {"weight": 0.6, "normalize": False, "int8_mask": True},
            "models": _models(ex, [{"density": 0.5}, {"density": [0.3, 0.9]}, {"density": 0.7}])},
        "ties-float16-out-float32": {
            "merge_method": "ties", "base_model": base, "dtype": "float16", "out_dtype": "float32",
            "parameters": {"lambda": 0.8, "rescale": True},
            "models": _models(ex, [{"weight": 0.7, "density": 0.5}, {"weight": 0.5, "density": 0.7},
                                   {"weight": 0.9, "density": 0.9}])},
        "breadcrumbs-gamma": {
            "merge_method": "breadcrumbs", "base_model": base, "dtype": "bfloat16",
            "models": _models(ex, [{"weight": 0.8, "density": 0.7, "gamma": 0.05},
                                   {"weight": 0.6, "density": 0.9, "gamma": 0.02},
                                   {"weight": 1.1, "density": 0.8, "gamma": 0.1}])},
        "breadcrumbs_ties-default-normalize": {
            "merge_method": "breadcrumbs_ties", "base_model": base, "dtype": "bfloat16",
            "models": _models(ex, [{"weight": 0.8, "density": 0.8, "gamma": 0.03},
                                   {"weight": 0.6, "density": 0.9},
                                   {"weight": 0.9, "density": 0.85, "gamma": 0.0}])},
        # density 1 keeps DARE/DELLA deterministic: what is left is their normalize and
        # rescale defaults (dare_ties: off / on; della: on / on), lambda and epsilon.
        "dare_ties-default-normalize": {
            "merge_method": "dare_ties", "base_model": base, "dtype": "bfloat16",
            "models": _models(ex, [{"weight": 0.8, "density": 1.0}, {"weight": 0.6, "density": 1.0},
                                   {"weight": 0.9}])},
        "dare_linear-lambda-rescale": {
            "merge_method": "dare_linear", "base_model": base, "dtype": "bfloat16",
            "parameters": {"lambda": 1.5, "rescale": False, "normalize": True},
            "models": _models(ex, [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.2}])},
        "della-epsilon": {
            "merge_method": "della", "base_model": base, "dtype": "bfloat16",
            "parameters": {"epsilon": 0.05},
            "models": _models(ex, [{"weight": 0.7, "density": 1.0}, {"weight": 0.4, "density": 1.0},
                                   {"weight": 0.9, "density": 1.0, "epsilon": 0.1}])},
        "della_linear-normalize": {
            "merge_method": "della_linear", "base_model": base, "dtype": "bfloat16",
            "parameters": {"normalize": True, "lambda": 0.8},
            "models": _models(ex, [{"weight": 0.7, "density": 1.0}, {"weight": 0.4, "density": 1.0},
                                   {"weight": 0.9, "density": 1.0}])},
        "task_arithmetic-filters-gradients": {
            "merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
            "parameters": {"lambda": 0.7, "normalize": True},
            "models": _models(ex, [
                {"weight": [{"filter": "self_attn", "value": [0.2, 0.9]}, {"filter": "mlp", "value": 0.4},
                            {"value": 1.0}]},
                {"weight": [0.5, 0.1, 0.8]},
                {"weight": [{"filter": "q_proj", "value": 1.2}, {"value": [1.0, 0.3]}]}])},
        "linear-no-normalize": {
            "merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": False},
            "models": _models([base, *ex], [{"weight": 0.4}, {"weight": [{"filter": "mlp", "value": 0.1},
                                                                       {"value": 0.3}]},
                                            {"weight": 0.2}, {"weight": [0.1, 0.4]}])},
        "slerp-classic": {
            "merge_method": "slerp", "base_model": ex[0], "dtype": "bfloat16",
            "slices": [{"sources": [{"model": ex[0], "layer_range": [0, 4]},
                                    {"model": ex[1], "layer_range": [0, 4]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                 {"value": 0.5}]}},
        # mergekit's functional methods: defaults, every parameter set, with and without a base
        "model_stock": {"merge_method": "model_stock", "base_model": base, "dtype": "bfloat16",
                        "models": _models(ex, [{}] * 3)},
        "nuslerp-base": {"merge_method": "nuslerp", "base_model": base, "dtype": "bfloat16",
                         "models": _models(ex[:2], [{"weight": [0.2, 0.9]}, {"weight": 0.8}])},
        "nuslerp-base-row_wise": {"merge_method": "nuslerp", "base_model": base, "dtype": "bfloat16",
                                  "parameters": {"nuslerp_row_wise": True},
                                  "models": _models(ex[1:], [{"weight": 0.3}, {"weight": 0.7}])},
        "model_stock-filter_wise": {"merge_method": "model_stock", "base_model": base, "dtype": "bfloat16",
                                    "parameters": {"filter_wise": True}, "models": _models(ex, [{}] * 3)},
        "nuslerp-per-row-base": {"merge_method": "nuslerp", "base_model": base, "dtype": "bfloat16",
                                 "parameters": {"nuslerp_flatten": False},
                                 "models": _models(ex[:2], [{"weight": 0.4}, {"weight": [0.9, 0.2]}])},
        "nuslerp-per-column-no-base": {"merge_method": "nuslerp", "dtype": "bfloat16",
                                       "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                       "models": _models(ex[1:], [{"weight": 0.6}, {"weight": 0.3}])},
        "nuslerp-no-base": {"merge_method": "nuslerp", "dtype": "bfloat16",
                            "models": _models(ex[1:], [{"weight": 0.6}, {"weight": 0.3}])},
        "multislerp-base": {"merge_method": "multislerp", "base_model": base, "dtype": "bfloat16",
                            "models": _models(ex, [{"weight": 0.3}, {"weight": 0.8}, {"weight": 0.5}])},
        "multislerp-no-base-unnormalized": {
            "merge_method": "multislerp", "dtype": "bfloat16",
            "parameters": {"normalize_weights": False, "eps": 1e-6},
            "models": _models(ex, [{"weight": 0.3}, {"weight": 0.4}, {"weight": 0.2}])},
        "karcher": {"merge_method": "karcher", "dtype": "bfloat16", "parameters": {"max_iter": 5, "tol": 1e-4},
                    "models": _models([base, *ex], [{}] * 4)},
        "nearswap-gradient": {"merge_method": "nearswap", "base_model": base, "dtype": "bfloat16",
                              "parameters": {"t": [0.001, 0.01]}, "models": _models(ex[:1], [{}])},
        "sce-default": {"merge_method": "sce", "base_model": base, "dtype": "bfloat16", "models": _models(ex, [{}] * 3)},
        "sce-select-gradient": {"merge_method": "sce", "base_model": base, "dtype": "bfloat16",
                                "parameters": {"select_topk": [0.3, 0.8], "int8_mask": True},
                                "models": _models(ex, [{}] * 3)},
        "ram": {"merge_method": "ram", "base_model": base, "dtype": "bfloat16", "parameters": {"epsilon": 0.002},
                "models": _models(ex, [{}] * 3)},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "dtype": "bfloat16",
                       "parameters": {"r": 0.4, "alpha": [0.1, 0.9], "epsilon": 0.001},
                       "models": _models(ex[:2], [{}] * 2)},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "dtype": "bfloat16",
                         "models": _models(ex[1:2], [{}])},
        "passthrough-layers": {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
            {"sources": [{"model": ex[0], "layer_range": [0, 2], "parameters": {"scale": 0.9}}]},
            {"sources": [{"model": ex[1], "layer_range": [2, 4]}]}]},
        "ties-slices": {
            "merge_method": "ties", "base_model": base, "dtype": "bfloat16",
            "parameters": {"normalize": False},
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, 2]},
                             {"model": ex[0], "layer_range": [0, 2], "parameters": {"weight": 0.9}},
                             {"model": ex[1], "layer_range": [0, 2], "parameters": {"weight": 0.4}}],
                 "parameters": {"density": 0.6}},
                {"sources": [{"model": base, "layer_range": [2, 4]},
                             {"model": ex[1], "layer_range": [2, 4], "parameters": {"weight": 0.7}},
                             {"model": ex[2], "layer_range": [2, 4],
                              "parameters": {"weight": 0.5, "density": 0.3}}],
                 "parameters": {"density": 0.8, "weight": 1.0}}]},
    }


CASE_NAMES = list(_cases("b", ["m0", "m1", "m2"]))


def _mergekit(config: dict, out) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, lazy_unpickle=False, random_seed=0))
    return load_file(str(out / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_NAMES)
def test_plain_merge_config_equals_mergekit(toy_family, tmp_path, case):
    base, experts = _family(toy_family)
    config = _cases(base, experts)[case]
    validated, recipe = read_merge_config(config)
    ours = load_file(str(export_merge(validated, recipe, tmp_path / "ours") / "model.safetensors"))
    theirs = _mergekit(config, tmp_path / "mergekit")
    assert set(ours) <= set(theirs)
    assert_equal_to_mergekit(recipe, ours, theirs)


@pytest.mark.slow
def test_chat_template_is_written_as_mergekit_writes_it(toy_family, tmp_path):
    """chat_template by one of mergekit's names, as a template, and "auto" (the template most
    of the models' tokenizers carry): the merged tokenizer carries mergekit's template."""
    import shutil

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoTokenizer

    base, experts = _family(toy_family)
    templated = []  # copies of the experts whose tokenizers carry templates: two of A, one of B
    for i, (expert, template) in enumerate(zip(experts, ["{{ 'A' }}{{ messages }}"] * 2 + ["{{ 'B' }}{{ messages }}"])):
        shutil.copytree(expert, tmp_path / f"expert{i}")
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / f"expert{i}")
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp_path / f"expert{i}")
        templated.append(str(tmp_path / f"expert{i}"))
    for i, template in enumerate(["chatml", "{% for m in messages %}{{ m['content'] }}{% endfor %}", "auto"]):
        config = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
                  "chat_template": template, "models": _models(templated, [{"weight": 0.5}] * 3)}
        validated, recipe = read_merge_config(config)
        ours = export_merge(validated, recipe, tmp_path / f"ours{i}")
        run_merge(MergeConfiguration.model_validate(config), str(tmp_path / f"mergekit{i}"),
                  MergeOptions(copy_tokenizer=True, lazy_unpickle=False, random_seed=0))
        want = AutoTokenizer.from_pretrained(tmp_path / f"mergekit{i}").chat_template
        assert want and AutoTokenizer.from_pretrained(ours).chat_template == want, template
    assert "A" in want  # auto: the template two of the three tokenizers carry


@pytest.mark.parametrize("case", ["model_stock-filter_wise", "nuslerp-per-row-base", "nuslerp-per-column-no-base"])
def test_per_row_merges_in_the_runtime_equal_the_export(toy_family, tmp_path, case):
    """The transformers runtime's live weights after apply equal the exported merge, per-row
    statistics included (eval scores the model export writes)."""
    from hotmerge.runtimes.hf import HFRuntime

    base, experts = _family(toy_family)
    validated, recipe = read_merge_config(_cases(base, experts)[case])
    exported = load_file(str(export_merge(validated, recipe, tmp_path / "out") / "model.safetensors"))
    runtime = HFRuntime(validated, device="cpu", seed=0)
    runtime.apply(recipe)
    live = runtime.model.state_dict()
    assert all(torch.equal(live[name], exported[name]) for name in exported)


def test_eval_builds_its_requests_through_the_configs_chat_template(toy_family):
    """eval of a merge config with chat_template scores the model its export writes: the
    requests go through that template."""
    from hotmerge.config.evolve import TaskConfig
    from hotmerge.search.worker import CandidateWorker

    base, experts = _family(toy_family)
    template = "{{ 'MARKED:' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = {**_cases(base, experts)["ties-lambda"], "chat_template": template}
    validated, recipe = read_merge_config(config)
    assert recipe.chat_template == template
    validated = validated.with_tasks([TaskConfig(name="toy_sum_mc_search")])
    worker = CandidateWorker(validated, chat_template=recipe.chat_template)
    try:
        contexts = [inst.arguments[0] for task in worker.suite.tasks.values() for inst in task.instances]
        assert contexts and all(c.startswith("MARKED:") for c in contexts)
    finally:
        worker.close()


def test_defaults_and_overrides_are_resolved_as_mergekit_does(toy_family):
    base, ex = _family(toy_family)
    cases = _cases(base, ex)
    _, dare = read_merge_config(cases["dare_ties-default-normalize"])
    assert dare.normalize is False and dare.rescale is True and dare.lambda_ == 1.0
    _, bt = read_merge_config(cases["breadcrumbs_ties-default-normalize"])
    assert bt.normalize is False
    name = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_allclose(bt.tensor(name).params["gamma"], [0.03, 0.01, 0.0])
    _, ties = read_merge_config(cases["ties-lambda"])
    assert ties.normalize is True and ties.lambda_ == 0.5
    _, della = read_merge_config(cases["della-epsilon"])
    np.testing.assert_allclose(della.tensor(name).params["epsilon"], [0.05, 0.05, 0.1])
    # gradient over 4 layers: layer 1 sits at t = 1/3 of [0.5, 0.1, 0.8] (2 intervals)
    _, ta = read_merge_config(cases["task_arithmetic-filters-gradients"])
    w = ta.tensor(name).params["weight"]
    assert w[0] == pytest.approx(0.4)  # the mlp filter
    assert w[1] == pytest.approx(0.5 + (0.1 - 0.5) * (2 / 3))
    assert w[2] == pytest.approx(1.0 + (0.3 - 1.0) / 3)
    assert ta.tensor("model.layers.1.self_attn.q_proj.weight").params["weight"][2] == pytest.approx(1.2)
    # embeddings: first slice at t = 0; final norm: last slice at t = 0
    assert ta.tensor("model.embed_tokens.weight").params["weight"][1] == pytest.approx(0.5)
    _, sl = read_merge_config(cases["ties-slices"])
    top = sl.tensor("model.layers.3.mlp.up_proj.weight").params
    models = list(sl.models)
    assert top["weight"][models.index(ex[0])] == 0 and top["weight"][models.index(ex[2])] == 0.5
    assert top["density"][models.index(ex[1])] == 0.8 and top["density"][models.index(ex[2])] == 0.3


@pytest.mark.parametrize("change, named", [
    ({"parameters": {"lambda": [0.5, 1.0]}}, "lambda"),
    ({"parameters": {"normalize": [{"filter": "mlp", "value": False}, {"value": True}]}}, "normalize"),
    ({"parameters": {"lamda": 0.5}}, "lamda"),
    ({"dtype": "float32"}, "dtype"),
    ({"modules": {"text": {}}}, "modules"),
    ({"chat_template": "nosuchtemplate"}, "chat_template"),
    ({"merge_mehtod": "ties"}, "merge_mehtod"),
    ({"merge_method": "arcee_fusion"}, "arcee_fusion merges exactly 1 models besides the base per slice"),
    ({"merge_method": "nuslerp"}, "nuslerp merges exactly 2 models besides the base per slice"),
])
def test_what_cannot_be_honoured_is_refused_by_name(toy_family, change, named):
    base, ex = _family(toy_family)
    config = {**_cases(base, ex)["ties-lambda"], **change}
    with pytest.raises(ConfigError, match=named):
        read_merge_config(config)


def test_slices_that_reorder_layers_are_refused(toy_family):
    base, ex = _family(toy_family)
    config = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
              "slices": [{"sources": [{"model": base, "layer_range": [0, 2]},
                                      {"model": ex[0], "layer_range": [2, 4], "parameters": {"weight": 1}}]}]}
    with pytest.raises(ConfigError, match="same layers"):
        read_merge_config(config)


def test_della_density_outside_epsilon_band_is_refused(toy_family):
    base, ex = _family(toy_family)
    config = {"merge_method": "della", "base_model": base, "dtype": "bfloat16",
              "models": _models(ex, [{"weight": 1, "density": 0.1, "epsilon": 0.15}] * 3)}
    with pytest.raises(ConfigError, match="epsilon"):
        read_merge_config(config)


def test_export_cli_refuses_in_one_line_and_leaves_nothing(toy_family, tmp_path):
    base, ex = _family(toy_family)
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({**_cases(base, ex)["ties-lambda"], "parameters": {"lambda": [0.5, 1]}}))
    assert "lambda" in _export_refused(config, tmp_path / "merged")


def _export_refused(config, out) -> str:
    """`hotmerge export CONFIG OUT` that must refuse: its one line, after checking exit 2 and
    that nothing was written."""
    done = subprocess.run([sys.executable, "-m", "hotmerge", "export", str(config), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return lines[0]


def test_a_merge_mergekit_raises_on_is_refused_in_one_line_naming_the_tensor(toy_family, tmp_path):
    """multislerp of three inputs whose weighted unit vectors cancel is undefined, and mergekit
    raises (checked here): `hotmerge export` refuses in one line naming the tensor, exit 2,
    nothing written; in a search it is a candidate error (errors.candidate_error_types)."""
    import shutil

    from hotmerge.errors import candidate_error_types
    from hotmerge.kernels import UndefinedMergeError

    base, _ = _family(toy_family)
    copies = [shutil.copytree(base, tmp_path / f"copy{i}") for i in range(3)]  # every delta zero
    data = {"merge_method": "multislerp", "base_model": base, "dtype": "bfloat16",
            "models": _models([str(c) for c in copies], [{"weight": 0.3}, {"weight": 0.8}, {"weight": 0.5}])}
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        _mergekit(data, tmp_path / "mergekit")
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(data))
    line = _export_refused(config, tmp_path / "merged")
    assert "multislerp" in line and ("model.embed_tokens.weight" in line or "model.layers." in line)
    assert UndefinedMergeError in candidate_error_types()


def _lora_adapter(model_path: str, out) -> str:
    """A PEFT LoRA adapter for a toy model, with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return str(out)


@pytest.mark.slow
def test_lora_source_equals_mergekit(toy_family, tmp_path):
    """`model+adapter` sources: the adapter is folded in once at load, as mergekit folds it
    (mergekit-yaml --lora-merge-cache), and the merge equals mergekit's."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from hotmerge.models.folder import ModelInfo, iter_tensors

    base, ex = _family(toy_family)
    adapter = _lora_adapter(ex[0], tmp_path / "adapter")
    config = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
              "models": _models([f"{ex[0]}+{adapter}", ex[1]], [{"weight": 0.7}, {"weight": 0.5}])}
    validated, recipe = read_merge_config(config)
    assert validated.models[0].lora == adapter
    ours = load_file(str(export_merge(validated, recipe, tmp_path / "ours") / "model.safetensors"))
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"),
              MergeOptions(copy_tokenizer=False, lazy_unpickle=False, lora_merge_cache=str(tmp_path / "cache")))
    theirs = load_file(str(tmp_path / "mergekit" / "model.safetensors"))
    names = list(ours)
    folded = dict(iter_tensors(ModelInfo.from_path(f"{ex[0]}+{adapter}"), names, dtype=torch.bfloat16))
    plain = load_file(f"{ex[0]}/model.safetensors")
    assert any(not torch.equal(folded[n], plain[n]) for n in names if "q_proj" in n)  # the adapter did something
    base_t, other = load_file(f"{base}/model.safetensors"), load_file(f"{ex[1]}/model.safetensors")
    for name in names:
        a, b = ours[name].float(), theirs[name].float()
        deltas = (folded[name].float() - base_t[name].float()).abs() + (other[name].float() - base_t[name].float()).abs()
        tolerance = ULPS * torch.maximum(a.abs(), b.abs()) * 2.0 ** -7 + 2.0 ** -6 * deltas
        assert not ((a - b).abs() > tolerance).any(), name


def test_lora_reference_needs_an_adapter_folder(toy_family, tmp_path):
    base, ex = _family(toy_family)
    config = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
              "models": _models([f"{ex[0]}+{tmp_path}", ex[1]], [{"weight": 0.7}, {"weight": 0.5}])}
    with pytest.raises(ConfigError, match="adapter_config.json"):
        read_merge_config(config)


def test_sharded_sources_merge_as_single_files(toy_family, tmp_path):
    """Sources saved as shards with model.safetensors.index.json merge to the same bits as
    single files, and a stray *.safetensors beside the shards is never read."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base, ex = _family(toy_family)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(ex[1], dtype=torch.bfloat16).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    stray = {k: torch.full_like(v, 7.0) for k, v in load_file(f"{ex[1]}/model.safetensors").items()}
    save_file(stray, str(sharded / "consolidated.safetensors"))
    outs = []
    for source in (ex[1], str(sharded)):
        config = {"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
                  "models": _models([ex[0], source], [{"weight": 0.6, "density": 0.7}, {"weight": 0.8, "density": 0.5}])}
        validated, recipe = read_merge_config(config)
        outs.append(load_file(str(export_merge(validated, recipe, tmp_path / f"out{len(outs)}") / "model.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from vlm_models import llava_family

    return llava_family(tmp_path_factory.mktemp("llava"))


def _vlm_cases(base, ex):
    """Merge configs over the Llava family: a layer gradient (each stack of layers placed by
    its own layer count), a magnitude cut, row ranks, per-row statistics, sce and arcee_fusion."""
    return {
        "linear-gradient": {"merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": False},
                            "models": _models(ex[:2], [{"weight": [0.0, 1.0]}, {"weight": 1.0}])},
        "ties": {"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
                 "models": _models(ex, [{"weight": 0.7, "density": [0.4, 0.8]}, {"weight": 0.5, "density": 0.6},
                                        {"weight": 0.9, "density": 0.7}])},
        "della": {"merge_method": "della", "base_model": base, "dtype": "bfloat16",
                  "models": _models(ex, [{"weight": 0.7, "density": 1.0}, {"weight": 0.4, "density": 1.0},
                                         {"weight": 0.9, "density": 1.0}])},
        "model_stock-filter_wise": {"merge_method": "model_stock", "base_model": base, "dtype": "bfloat16",
                                    "parameters": {"filter_wise": True}, "models": _models(ex, [{}] * 3)},
        "sce": {"merge_method": "sce", "base_model": base, "dtype": "bfloat16", "parameters": {"select_topk": 0.5},
                "models": _models(ex, [{}] * 3)},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "dtype": "bfloat16",
                         "models": _models(ex[1:2], [{}])},
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_vlm_cases("b", ["m0", "m1", "m2"])))
def test_vision_language_merge_equals_mergekit(llava, tmp_path, case):
    """A Llava merge: every tensor (vision tower, projector, language model) under its own
    name, equal to mergekit-yaml's, with the reference's config and processor files; the
    folder loads with transformers."""
    base, experts = llava
    config = _vlm_cases(base, experts)[case]
    validated, recipe = read_merge_config(config)
    out = export_merge(validated, recipe, tmp_path / "ours")
    ours = load_file(str(out / "model.safetensors"))
    theirs = _mergekit(config, tmp_path / "mergekit")
    assert set(ours) == set(theirs) == set(load_file(f"{base}/model.safetensors"))
    assert any("vision_tower" in n for n in ours) and any("multi_modal_projector" in n for n in ours)
    assert_equal_to_mergekit(recipe, ours, theirs)
    if config.get("base_model"):
        assert (out / "preprocessor_config.json").is_file()
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert torch.equal(model.get_input_embeddings().weight, ours["model.language_model.embed_tokens.weight"])


def test_vision_language_export_writes_shards_with_an_index(llava, tmp_path, monkeypatch):
    """Above the shard size the tensors go to several safetensors files and an index that
    transformers reads, holding the same tensors as one file."""
    from hotmerge.run import export
    from parity import folder_tensors

    base, experts = llava
    validated, recipe = read_merge_config(_vlm_cases(base, experts)["ties"])
    whole = folder_tensors(export_merge(validated, recipe, tmp_path / "whole"))
    monkeypatch.setattr(export, "SHARD_SIZE", "20KB")
    sharded = export_merge(validated, recipe, tmp_path / "sharded")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    got = folder_tensors(sharded)
    assert set(got) == set(whole) and all(torch.equal(got[n], whole[n]) for n in whole)
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(sharded)


def test_vision_language_models_are_not_scored_and_slices_over_two_stacks_are_refused(llava, tmp_path):
    """eval refuses a Llava merge in one line before any weight loads (the runtimes load causal
    language models); slices over a model with two stacks of layers are refused by name."""
    base, experts = llava
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_vlm_cases(base, experts)["ties"]))
    done = subprocess.run([sys.executable, "-m", "hotmerge", "eval", str(config), "--tasks", "toy_sum_mc_search",
                           "--output", str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "llava" in lines[0] and "hotmerge export" in lines[0], lines
    assert not (tmp_path / "eval.json").exists()
    genome = tmp_path / "evolve.yaml"
    genome.write_text(yaml.safe_dump({"genome": {"models": experts, "base_model": base, "merge_method": "ties"},
                                      "tasks": ["toy_sum_mc_search"]}))
    done = subprocess.run([sys.executable, "-m", "hotmerge", "evolve", str(genome), "--storage-path",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "llava" in lines[0], done.stderr
    assert not (tmp_path / "run").exists()
    sliced = {"merge_method": "linear", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": m, "layer_range": [0, 2], "parameters": {"weight": 0.5}} for m in experts[:2]]}]}
    with pytest.raises(ConfigError, match="2 stacks of layers"):
        read_merge_config(sliced)
