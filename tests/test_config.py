"""Config loading and validation: every bad input is a ConfigError with one line."""

import json
import math
import os
import shutil

import pytest
import yaml

from hotmerge.config.evolve import (
    BASE_METHODS,
    EvolveConfig,
    load_config,
    parse_config,
    validate_config,
)
from hotmerge.errors import ConfigError
from hotmerge.kernels.methods import get_method
from hotmerge.models.folder import ModelInfo, layer_index

try:
    from tests.tinymodels import make_llama_family
except ImportError:
    from tinymodels import make_llama_family


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """tmp/models/{base, model_0, model_1} plus odd ones out for the mismatch tests."""
    root = tmp_path_factory.mktemp("cfg")
    make_llama_family(root / "models", n_models=2, seed=0)
    # same tensors, different shapes: intermediate_size 96
    make_llama_family(root / "wide", n_models=0, seed=1, intermediate_size=96)
    # tied embeddings: no lm_head.weight tensor
    make_llama_family(root / "tied", n_models=0, seed=2, tie_word_embeddings=True)
    return root / "models"


@pytest.fixture
def cfg_dir(tmp_path, models_dir):
    """A config folder with its own copy of the models, so tests may edit them."""
    shutil.copytree(models_dir, tmp_path / "models")
    return tmp_path


def base_config(**genome):
    g = {
        "models": ["models/model_0", "models/model_1"],
        "merge_method": "ties",
        "base_model": "models/base",
        "layer_granularity": 2,
    }
    g.update(genome)
    return {"genome": {k: v for k, v in g.items() if v is not None}, "tasks": ["toy_add"]}


def write(cfg_dir, data, name="evolve.yaml"):
    path = cfg_dir / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def load_and_validate(path):
    return validate_config(load_config(path))


def config_error(path) -> str:
    with pytest.raises(ConfigError) as e:
        load_and_validate(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# -- good configs -------------------------------------------------------------


def test_loads_mergekit_evolve_config(cfg_dir):
    text = """
genome:
  models: [models/model_0, models/model_1]
  merge_method: dare_ties
  base_model: models/base
  layer_granularity: 2
  filters: [self_attn, mlp]
  normalize: false
tasks:
  - name: toy_add
    weight: 2.0
  - toy_rev
  - {name: toy_sort, metric: "exact_match,none"}
limit: 50
num_fewshot: 0
"""
    v = load_and_validate(write(cfg_dir, text))
    cfg = v.config
    assert cfg.genome.models == [str(cfg_dir / "models/model_0"), str(cfg_dir / "models/model_1")]
    assert cfg.genome.base_model == str(cfg_dir / "models/base")
    assert [(t.name, t.weight, t.metric) for t in cfg.tasks] == [
        ("toy_add", 2.0, "acc,none"),
        ("toy_rev", 1.0, "acc,none"),
        ("toy_sort", 1.0, "exact_match,none"),
    ]
    assert (cfg.limit, cfg.num_fewshot, cfg.seed, cfg.task_paths) == (50, 0, 42, [])
    assert cfg.apply_chat_template and cfg.fewshot_as_multiturn and not cfg.shuffle
    assert v.num_layers == 4 and v.base.path == str(cfg_dir / "models/base")
    assert v.genome().shape == (2, 2, 3, 2)


def test_defaults_match_mergekit():
    EvolMergeConfiguration = pytest.importorskip("mergekit.evo.config").EvolMergeConfiguration

    data = {"genome": {"models": ["/a", "/b"], "merge_method": "linear"}, "tasks": ["t"]}
    ours = EvolveConfig.model_validate(data)
    theirs = EvolMergeConfiguration.model_validate(data)
    for key in ("limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template", "fewshot_as_multiturn"):
        assert getattr(ours, key) == getattr(theirs, key)
    for key in ("layer_granularity", "normalize", "allow_negative_weights", "filters", "smooth", "tokenizer_source"):
        assert getattr(ours.genome, key) == getattr(theirs.genome, key)
    assert ours.tasks[0].model_dump() == theirs.tasks[0].model_dump()


def test_relative_paths_fall_back_to_cwd(cfg_dir, tmp_path_factory, monkeypatch):
    # Paths that do not exist beside the config file are taken from the CWD.
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    conf_dir = elsewhere / "conf"
    conf_dir.mkdir()
    monkeypatch.chdir(cfg_dir)
    cfg = load_config(write(conf_dir, base_config()))
    assert cfg.genome.base_model == str(cfg_dir / "models/base")
    validate_config(cfg)


def test_hotmerge_keys(cfg_dir):
    (cfg_dir / "tasks").mkdir()
    data = {**base_config(), "task_paths": ["tasks"], "seed": 7}
    cfg = load_and_validate(write(cfg_dir, data)).config
    assert cfg.task_paths == [str(cfg_dir / "tasks")] and cfg.seed == 7


def test_base_model_listed_in_models(cfg_dir):
    data = base_config(models=["models/base", "models/model_0"], merge_method="linear")
    v = load_and_validate(write(cfg_dir, data))
    assert v.genome().base_index == 0


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_methods_without_base(cfg_dir, method):
    load_and_validate(write(cfg_dir, base_config(merge_method=method, base_model=None)))


def test_model_info(models_dir, tmp_path):
    info = ModelInfo.from_path(models_dir / "base")
    assert info.architectures == ["LlamaForCausalLM"] and info.num_layers == 4
    assert not info.tie_word_embeddings
    assert info.tensors["model.layers.1.mlp.up_proj.weight"].shape == (128, 64)
    assert info.tensors["lm_head.weight"].dtype == "BF16"
    assert len(info.layer_tensors(3)) == 9 and "model.norm.weight" in info.non_layer_tensors()
    tied = ModelInfo.from_path(models_dir.parent / "tied" / "base")
    assert tied.tie_word_embeddings and "lm_head.weight" not in tied.tensors


def test_model_info_sharded(models_dir, tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(models_dir / "base").save_pretrained(
        tmp_path / "sharded", max_shard_size="100KB"
    )
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = ModelInfo.from_path(tmp_path / "sharded")
    single = ModelInfo.from_path(models_dir / "base")
    assert {k: v.shape for k, v in sharded.tensors.items()} == {k: v.shape for k, v in single.tensors.items()}


def test_layer_index():
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_index("layers.0.w") == 0
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None
    assert layer_index("model.norm.weight") is None


# -- bad configs: one test per problem ---------------------------------------


def test_missing_file(tmp_path):
    msg = config_error(tmp_path / "nope.yaml")
    assert "does not exist" in msg


def test_malformed_yaml(cfg_dir):
    msg = config_error(write(cfg_dir, "genome:\n  models: [a, b\ntasks: [x]\n"))
    assert "malformed YAML" in msg and "line" in msg


def test_empty_file(cfg_dir):
    assert "empty" in config_error(write(cfg_dir, ""))


def test_not_a_mapping(cfg_dir):
    assert "mapping" in config_error(write(cfg_dir, "- a\n- b\n"))


def test_unknown_top_level_key(cfg_dir):
    msg = config_error(write(cfg_dir, {**base_config(), "populaton_size": 10}))
    assert "unknown key 'populaton_size'" in msg and "genome" in msg


def test_unknown_genome_key(cfg_dir):
    data = base_config()
    data["genome"]["layer_granularty"] = 2
    msg = config_error(write(cfg_dir, data))
    assert "layer_granularty" in msg and "layer_granularity" in msg


def test_unknown_method(cfg_dir):
    msg = config_error(write(cfg_dir, base_config(merge_method="frankenmerge")))
    assert "genome.merge_method" in msg and "frankenmerge" in msg and "ties" in msg


def test_missing_merge_method(cfg_dir):
    data = base_config()
    del data["genome"]["merge_method"]
    msg = config_error(write(cfg_dir, data))
    assert "genome.merge_method is missing" in msg


def test_missing_tasks(cfg_dir):
    data = base_config()
    del data["tasks"]
    assert "tasks is missing" in config_error(write(cfg_dir, data))


def test_granularity_does_not_divide(cfg_dir):
    msg = config_error(write(cfg_dir, base_config(layer_granularity=3)))
    assert "layer_granularity=3 does not divide num_hidden_layers=4" in msg and "0 for one group" in msg


def test_negative_granularity(cfg_dir):
    msg = config_error(write(cfg_dir, base_config(layer_granularity=-1)))
    assert "genome.layer_granularity" in msg and "-1" in msg


def test_granularity_wrong_type(cfg_dir):
    msg = config_error(write(cfg_dir, base_config(layer_granularity="two")))
    assert "genome.layer_granularity" in msg and "'two'" in msg and "whole number" in msg


def test_bool_wrong_type(cfg_dir):
    msg = config_error(write(cfg_dir, base_config(smooth="sometimes")))
    assert "genome.smooth" in msg and "true or false" in msg


@pytest.mark.parametrize("method", [m for m in BASE_METHODS if get_method(m).searchable])
def test_missing_base_model(cfg_dir, method):
    msg = config_error(write(cfg_dir, base_config(merge_method=method, base_model=None)))
    assert "needs base_model" in msg and method in msg


def test_slerp_with_filters(cfg_dir):
    data = base_config(merge_method="slerp", base_model=None, filters=["mlp"])
    assert "slerp does not support filters" in config_error(write(cfg_dir, data))


def test_slerp_with_smooth(cfg_dir):
    data = base_config(merge_method="slerp", base_model=None, smooth=True)
    assert "slerp does not support smooth" in config_error(write(cfg_dir, data))


def test_slerp_needs_two_models(cfg_dir):
    data = base_config(merge_method="slerp", base_model=None, models=["models/model_0"])
    assert "at least 2 models" in config_error(write(cfg_dir, data))


def test_slerp_with_separate_base(cfg_dir):
    data = base_config(merge_method="slerp")
    assert "slerp takes 2" in config_error(write(cfg_dir, data))


def test_linear_with_separate_base(cfg_dir):
    msg = config_error(write(cfg_dir, base_config(merge_method="linear")))
    assert "linear" in msg and "add base_model to genome.models" in msg


def test_empty_models(cfg_dir):
    msg = config_error(write(cfg_dir, base_config(models=[])))
    assert "genome.models" in msg and "empty" in msg


def test_models_not_a_list(cfg_dir):
    msg = config_error(write(cfg_dir, base_config(models="models/model_0")))
    assert "genome.models" in msg and "list" in msg


def test_duplicate_model(cfg_dir):
    data = base_config(models=["models/model_0", "./models/model_0"])
    assert "twice" in config_error(write(cfg_dir, data))


def test_lora_reference_resolves_both_folders_and_checks_the_adapter(cfg_dir):
    data = base_config(models=["models/model_0+adapters/a", "models/model_1"])
    assert "adapter folder" in config_error(write(cfg_dir, data))
    (cfg_dir / "adapters" / "a").mkdir(parents=True)
    cfg = load_config(write(cfg_dir, data))  # both halves beside the config file
    assert cfg.genome.models[0] == f"{cfg_dir / 'models/model_0'}+{cfg_dir / 'adapters/a'}"
    assert "adapter_config.json" in config_error(write(cfg_dir, data))
    assert "model+adapter" in config_error(write(cfg_dir, base_config(models=["models/model_0+", "models/model_1"])))


def test_empty_filter(cfg_dir):
    assert "genome.filters" in config_error(write(cfg_dir, base_config(filters=["mlp", ""])))


def test_missing_model_folder(cfg_dir):
    msg = config_error(write(cfg_dir, base_config(models=["models/model_0", "models/nope"])))
    assert "genome.models[1]" in msg and "does not exist" in msg


def test_missing_base_folder(cfg_dir):
    msg = config_error(write(cfg_dir, base_config(base_model="models/nope")))
    assert "genome.base_model" in msg and "does not exist" in msg


def test_missing_config_json(cfg_dir):
    os.remove(cfg_dir / "models/model_1/config.json")
    msg = config_error(write(cfg_dir, base_config()))
    assert "genome.models[1]" in msg and "config.json" in msg


def test_missing_safetensors(cfg_dir):
    os.remove(cfg_dir / "models/model_0/model.safetensors")
    msg = config_error(write(cfg_dir, base_config()))
    assert "genome.models[0]" in msg and "safetensors" in msg


def edit_config_json(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_architecture_mismatch(cfg_dir):
    edit_config_json(cfg_dir / "models/model_1", architectures=["MistralForCausalLM"])
    msg = config_error(write(cfg_dir, base_config()))
    assert "genome.models[1]" in msg and "MistralForCausalLM" in msg and "LlamaForCausalLM" in msg


def test_layer_count_mismatch(cfg_dir):
    edit_config_json(cfg_dir / "models/model_0", num_hidden_layers=8)
    msg = config_error(write(cfg_dir, base_config()))
    assert "genome.models[0]" in msg and "8 layers" in msg and "4" in msg


def test_tensor_name_mismatch(cfg_dir, models_dir):
    # a tied-embeddings model has no lm_head.weight
    shutil.copytree(models_dir.parent / "tied" / "base", cfg_dir / "models/tied")
    msg = config_error(write(cfg_dir, base_config(models=["models/model_0", "models/tied"])))
    assert "genome.models[1]" in msg and "lm_head.weight" in msg


def test_tensor_shape_mismatch(cfg_dir, models_dir):
    shutil.copytree(models_dir.parent / "wide" / "base", cfg_dir / "models/wide")
    msg = config_error(write(cfg_dir, base_config(models=["models/wide", "models/model_1"])))
    assert "genome.models[0]" in msg and "model.layers.0.mlp" in msg and "96]" in msg and "128]" in msg


def test_empty_tasks(cfg_dir):
    msg = config_error(write(cfg_dir, {**base_config(), "tasks": []}))
    assert "tasks" in msg and "empty" in msg


@pytest.mark.parametrize("weight", [math.nan, math.inf])
def test_task_weight_not_finite(cfg_dir, weight):
    data = {**base_config(), "tasks": [{"name": "toy_add", "weight": weight}]}
    msg = config_error(write(cfg_dir, data))
    assert "tasks[0].weight" in msg and "finite" in msg


def test_task_wrong_type(cfg_dir):
    msg = config_error(write(cfg_dir, {**base_config(), "tasks": [{"name": "a", "weight": "heavy"}]}))
    assert "tasks[0].weight" in msg


def test_unknown_task_key(cfg_dir):
    msg = config_error(write(cfg_dir, {**base_config(), "tasks": [{"name": "a", "metrc": "acc"}]}))
    assert "metrc" in msg and "metric" in msg


@pytest.mark.parametrize("limit", [0, -5])
def test_limit_not_positive(cfg_dir, limit):
    msg = config_error(write(cfg_dir, {**base_config(), "limit": limit}))
    assert "limit" in msg and str(limit) in msg


def test_negative_fewshot(cfg_dir):
    assert "num_fewshot" in config_error(write(cfg_dir, {**base_config(), "num_fewshot": -1}))


def test_missing_task_path(cfg_dir):
    msg = config_error(write(cfg_dir, {**base_config(), "task_paths": ["no_such_dir"]}))
    assert "task_paths[0]" in msg and "does not exist" in msg


def test_bad_tokenizer_source(cfg_dir):
    msg = config_error(write(cfg_dir, base_config(tokenizer_source="models/nope")))
    assert "tokenizer_source" in msg


def test_several_problems_still_one_line(cfg_dir):
    data = {"genome": {"models": 3, "merge_method": 5, "layer_granularity": "x"}, "tasks": 1}
    msg = config_error(write(cfg_dir, data))
    assert "more problems" in msg


def test_parse_config_dict():
    with pytest.raises(ConfigError) as e:
        parse_config({"genome": {"models": ["/a"], "merge_method": "ties"}, "tasks": ["t"]})
    assert "needs base_model" in str(e.value)


@pytest.mark.parametrize("task, refused", [
    ("mmlu_high_school_biology", True), ("gsm8k", True), ("arc_easy", True), ("leaderboard_ifeval", True),
    ("gsm8k_train", False), ("toy_sum_mc_search", False), ("my_mmlu", False),
])
def test_benchmark_tasks_are_refused_without_the_flag(task, refused):
    from hotmerge.config.evolve import ALLOW_BENCHMARKS_FLAG, check_benchmark_tasks

    cfg = parse_config({"genome": {"models": ["a", "b"], "merge_method": "linear"}, "tasks": [task]})
    if refused:
        with pytest.raises(ConfigError, match=f"{task} is a common benchmark.*{ALLOW_BENCHMARKS_FLAG}"):
            check_benchmark_tasks(cfg, allow=False)
        assert check_benchmark_tasks(cfg, allow=True) == [task]
    else:
        assert check_benchmark_tasks(cfg, allow=False) == []


def test_evolve_refuses_a_benchmark_task_in_one_line_and_lists_the_flag(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"genome": {"models": ["a", "b"], "merge_method": "linear"},
                                      "tasks": ["hellaswag"]}))
    done = subprocess.run([sys.executable, "-m", "hotmerge", "evolve", str(config), "--storage-path",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "hellaswag" in lines[0] and "--i-understand-the-depths" in lines[0]
    assert not (tmp_path / "run").exists()
    shown = subprocess.run([sys.executable, "-m", "hotmerge", "evolve", "--help"], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert "--i-understand-the-depths-of-the-evils-i-am-unleashing" in shown.stdout


def test_tokenizer_source_over_renumbered_vocabularies(toy_family, tmp_path):
    """Same ids: nothing moves. Two ids swapped: merged by index without tokenizer_source (as
    mergekit does), and with it the swapped model's rows are moved into the output vocabulary
    (tests/test_vocabulary.py compares such merges with mergekit's)."""
    import json

    other = tmp_path / "expert_sum_renumbered"
    shutil.copytree(toy_family.experts[2], other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[4:6]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))

    def genome(models, **extra):
        return {"genome": {"models": [str(m) for m in models], "base_model": str(toy_family.base),
                           "merge_method": "task_arithmetic", **extra}, "tasks": ["toy_sum_mc_search"]}

    same = validate_config(parse_config(genome(toy_family.experts, tokenizer_source="base")))
    assert all(info.vocabulary is None for info in same.models) and same.vocabulary.size == 180
    plain = validate_config(parse_config(genome([*toy_family.experts[:2], other])))  # rows by index, as mergekit
    assert plain.vocabulary is None and plain.tokenizer_path == str(toy_family.base)
    moved = validate_config(parse_config(genome([*toy_family.experts[:2], other], tokenizer_source="union")))
    assert moved.models[2].vocabulary is not None and moved.vocabulary.size == 180
    assert moved.vocabulary.permutations[str(other)][vocab[first]] == vocab[second]
