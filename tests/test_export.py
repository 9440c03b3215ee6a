"""`hotmerge export` and `hotmerge eval`: a merge config or a genotype in, a model folder or metrics out."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from hotmerge.config.evolve import parse_config, validate_config
from hotmerge.config.merge import load_merge_config

CASES = [
    dict(merge_method="ties", layer_granularity=2, filters=["self_attn"]),
    dict(merge_method="task_arithmetic", layer_granularity=1, smooth=True),
    dict(merge_method="dare_ties", layer_granularity=0),
    dict(merge_method="slerp", layer_granularity=2),
]


def _validated(family, case):
    genome = {"models": [str(p) for p in family.experts], **case}
    if case["merge_method"] != "slerp":
        genome["base_model"] = str(family.base)
    return validate_config(parse_config({"genome": genome, "tasks": ["toy_sum_mc_search"]}))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["merge_method"])
def test_merge_config_round_trips_to_the_same_recipe(toy_family, tmp_path, case):
    validated = _validated(toy_family, case)
    genome = validated.genome()
    x = np.random.default_rng(1).uniform(0.05, 1.0, genome.size)
    path = tmp_path / "best_config.yaml"
    path.write_text(yaml.safe_dump(genome.to_mergekit_config(x)))
    again, loaded = load_merge_config(path)
    original = genome.decode(x)
    assert (loaded.normalize, loaded.rescale, loaded.lambda_) == (original.normalize, original.rescale, 1.0)
    for name in validated.reference.tensors:
        a, b = original.tensor(name), loaded.tensor(name)
        if case["merge_method"] == "slerp":
            before, after = validated.config.genome.models, loaded.models
            assert (before[a.base], before[a.other]) == (after[b.base], after[b.other])
            assert b.t == pytest.approx(a.t, abs=1e-12)
        else:
            assert loaded.models == tuple(validated.config.genome.models)
            for key, value in a.params.items():
                np.testing.assert_allclose(b.params[key], value, atol=1e-12)


@pytest.mark.slow  # hotmerge export in a subprocess
def test_export_writes_a_model_that_transformers_loads(toy_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    validated = _validated(toy_family, CASES[0])
    genome = validated.genome()
    x = np.random.default_rng(2).uniform(0.05, 1.0, genome.size)
    config = tmp_path / "best_config.yaml"
    config.write_text(yaml.safe_dump(genome.to_mergekit_config(x)))
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "hotmerge", "export", str(config), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    AutoTokenizer.from_pretrained(out)
    base = load_file(str(toy_family.base / "model.safetensors"))
    merged = {k: v for k, v in model.state_dict().items()}
    changed = sum(int((merged[k] != base[k]).any()) for k in base)
    assert changed == len(base)  # every tensor took part in the merge


@pytest.mark.slow  # hotmerge eval in a subprocess
def test_eval_writes_lm_eval_results_layout(toy_family, tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "genome": {"models": [str(p) for p in toy_family.experts], "base_model": str(toy_family.base),
                   "merge_method": "task_arithmetic"},
        "tasks": ["toy_sum_mc_search", {"name": "toy_sum_gen_search", "metric": "exact_match,none"}],
        "apply_chat_template": False}))
    out = tmp_path / "metrics.json"
    done = subprocess.run([sys.executable, "-m", "hotmerge", "eval", str(config), "--x0", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    acc = data["results"]["toy_sum_mc_search"]["acc,none"]
    em = data["results"]["toy_sum_gen_search"]["exact_match,none"]
    assert 0 <= acc <= 1 and 0 <= em <= 1
    assert data["score"] == pytest.approx(acc + em)


def test_export_refuses_a_merge_config_with_a_genotype(toy_family, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(toy_family.base),
                                      "models": [{"model": str(toy_family.experts[0]),
                                                  "parameters": {"weight": 1.0}}]}))
    done = subprocess.run([sys.executable, "-m", "hotmerge", "export", str(config), str(tmp_path / "o"), "--x0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: ")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # three hotmerge eval subprocesses
def test_eval_scores_a_merge_config_as_its_genotype(toy_family, tmp_path):
    """`hotmerge eval` takes a mergekit merge config (with --tasks) and scores the same model
    as the genotype that wrote it."""
    genome_config = tmp_path / "toy.yaml"
    genome_config.write_text(yaml.safe_dump({
        "genome": {"models": [str(p) for p in toy_family.experts], "base_model": str(toy_family.base),
                   "merge_method": "ties", "layer_granularity": 2},
        "tasks": ["toy_color_mc_search"], "apply_chat_template": False}))
    validated = validate_config(parse_config(yaml.safe_load(genome_config.read_text())))
    genome = validated.genome()
    x = np.random.default_rng(4).uniform(0.2, 1.0, genome.size)
    (tmp_path / "x.json").write_text(json.dumps(x.tolist()))
    merge_config = tmp_path / "best_config.yaml"
    merge_config.write_text(yaml.safe_dump(genome.to_mergekit_config(x)))
    # the three commands side by side (two mostly import and load, one is refused)
    commands = [[str(genome_config), "--genotype", str(tmp_path / "x.json"), "--output", str(tmp_path / "s0.json")],
                [str(merge_config), "--tasks", "toy_color_mc_search", "--output", str(tmp_path / "s1.json")],
                [str(merge_config)]]
    processes = [subprocess.Popen([sys.executable, "-m", "hotmerge", "eval", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for args in commands]
    done = [(process.communicate(timeout=300)[1], process.returncode) for process in processes]
    scores = []
    for i in (0, 1):
        stderr, code = done[i]
        assert code == 0, stderr
        scores.append(json.loads((tmp_path / f"s{i}.json").read_text())["results"]["toy_color_mc_search"]["acc,none"])
    assert scores[0] == scores[1]
    stderr, code = done[2]
    assert code == 2 and "--tasks" in stderr
