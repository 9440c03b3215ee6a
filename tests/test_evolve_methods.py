"""evolve on mergekit's functional methods: what they search, the config they leave, and the
one-line refusal of a method with nothing to search."""

import subprocess

import pytest
import yaml
from runs import HOTMERGE, evolve_cmd, read_history, search_config

from hotmerge.config.merge import read_merge_config


@pytest.mark.slow
# multislerp's and nuslerp's per-model genes: tests/test_genome.py against mergekit's planner
@pytest.mark.parametrize("method, experts, gene", [("nearswap", 1, "t")])
def test_a_functional_method_searches_and_leaves_a_config_mergekit_reads(toy_family, tmp_path, method,
                                                                        experts, gene):
    config = search_config(toy_family, tmp_path / "toy.yaml", merge_method=method,
                           models=[str(p) for p in toy_family.experts[:experts]])
    run_dir = tmp_path / "run"
    done = subprocess.run(evolve_cmd(config, run_dir, 6), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = read_history(run_dir)
    assert len(records) == 6 and len({r["score"] for r in records}) > 1  # the genes move the merge
    best = max(records, key=lambda r: r["score"])
    merge = yaml.safe_load((run_dir / "best_config.yaml").read_text())
    _, recipe = read_merge_config(merge)
    # two layer groups x one filter set + catch-all; shared genes (nearswap's t) once per merge
    genes_per_set = 1 if method == "nearswap" else experts
    assert len(best["genotype"]) == 2 * 2 * genes_per_set
    value = recipe.tensor("model.layers.0.self_attn.q_proj.weight").params[gene][0]
    assert value == pytest.approx(abs(best["genotype"][0]))


def test_evolve_refuses_a_method_with_nothing_to_search_in_one_line(toy_family, tmp_path):
    config = search_config(toy_family, tmp_path / "toy.yaml", merge_method="model_stock")
    done = subprocess.run([*HOTMERGE, "evolve", str(config), "--storage-path", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "model_stock has no parameter for evolve to search" in lines[0], lines
    assert not (tmp_path / "run").exists()
