"""The toy family is only useful if merging means something on it; these tests measure that with lm-eval."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hotmerge.toy.build import build_family
from hotmerge.toy.evaluate import lm_eval_scores
from hotmerge.toy.taskfiles import TASKS_DIR, render_tasks, task_name
from hotmerge.toy.world import SKILLS

MARGIN = 0.2


def test_shipped_task_files_match_the_generator():
    rendered = render_tasks(seed=0)
    # The smol family's files (smol_*) share the folder; tests/test_smol.py checks them.
    shipped = {p.name: p.read_text() for p in TASKS_DIR.iterdir() if p.is_file() and not p.name.startswith("smol_")}
    assert shipped == rendered


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow  # builds (trains) a second family
def test_family_is_deterministic_from_its_seed(toy_family, tmp_path):
    # the base and the last expert (trained from its own seed) are enough, and cost half the build
    skill = SKILLS[-1]
    again = build_family(tmp_path / "again", seed=0, log=lambda *_: None, skills=(skill,))
    for mine, theirs in [(toy_family.base, again.base), (toy_family.expert(skill), again.expert(skill))]:
        assert _digest(mine) == _digest(theirs), mine.name


def _task_arithmetic_merge(family, out: Path) -> Path:
    """A plain task_arithmetic merge (weight 1 per expert), made by mergekit itself."""
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(family.base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family.experts],
        "dtype": "bfloat16",
    }
    (out.parent / "ta.yaml").write_text(yaml.safe_dump(config))
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(mergekit_yaml), str(out.parent / "ta.yaml"), str(out)], check=True, capture_output=True)
    return out


@pytest.mark.slow  # mergekit-yaml, then lm-eval on five models
@pytest.mark.parametrize("variant", ["mc", "gen"])
def test_experts_specialise_and_task_arithmetic_combines_them(toy_family, tmp_path, variant, capsys):
    merged = _task_arithmetic_merge(toy_family, tmp_path / "merged")
    models = {"base": toy_family.base, "task_arithmetic": merged}
    models |= {f"expert_{s}": toy_family.expert(s) for s in SKILLS}
    tasks = {s: task_name(s, variant, "heldout") for s in SKILLS}
    table = {}
    for name, path in models.items():
        scores = lm_eval_scores(path, list(tasks.values()))
        table[name] = {s: scores[t] for s, t in tasks.items()}
    mean = {name: sum(row.values()) / len(row) for name, row in table.items()}

    with capsys.disabled():
        print(f"\ntoy family, held-out {variant}:")
        for name, row in table.items():
            cells = "  ".join(f"{s}={v:.2f}" for s, v in row.items())
            print(f"  {name:18s} {cells}  mean={mean[name]:.3f}")

    for skill in SKILLS:
        expert = table[f"expert_{skill}"]
        gain = expert[skill] - table["base"][skill]
        assert gain >= MARGIN, f"expert_{skill} beats the base on {skill} by only {gain:.2f}"
        gaps = [table[f"expert_{other}"][other] - expert[other] for other in SKILLS if other != skill]
        assert max(gaps) >= MARGIN, f"expert_{skill} is not clearly weaker on any other skill: {gaps}"
    best_expert = max(mean[f"expert_{s}"] for s in SKILLS)
    with capsys.disabled():
        print(f"  margin of task_arithmetic over the best expert: {mean['task_arithmetic'] - best_expert:+.3f}")
    assert mean["task_arithmetic"] > best_expert + 0.05
