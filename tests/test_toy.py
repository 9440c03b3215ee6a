"""The toy family is only useful if merging means something on it; these tests measure that with lm-eval."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hotmerge.toy import build
from hotmerge.toy.evaluate import lm_eval_scores
from hotmerge.toy.taskfiles import TASKS_DIR, render_tasks, task_name
from hotmerge.toy.world import SKILLS

MARGIN = 0.2


def test_shipped_task_files_match_the_generator():
    rendered = render_tasks(seed=0)
    # The smol family's files (smol_*) share the folder; tests/test_smol.py checks them.
    shipped = {p.name: p.read_text() for p in TASKS_DIR.iterdir() if p.is_file() and not p.name.startswith("smol_")}
    assert shipped == rendered


def _digest(folder: Path, name: str = "model.safetensors") -> str:
    return hashlib.sha256((folder / name).read_bytes()).hexdigest()


# The whole build's code (tokenizer, init, seeded batches, AdamW and its schedule, the bf16
# save, the expert's reload of the saved base) on few steps: what is not deterministic differs
# after a step. The toy_family fixture's build is not built again here.
FEW_STEPS = {"BASE_STEPS": 20, "EXPERT_STEPS": 10}
# The facts and the vocabulary, printed by another process with another string-hash seed.
WORLD = "from hotmerge.toy.world import build_facts, vocabulary; f = build_facts(0); print(repr((f, vocabulary(f))))"


@pytest.mark.slow  # trains a base and an expert twice, and another base (few steps each)
def test_family_is_deterministic_from_its_seed(tmp_path, monkeypatch):
    """Two builds from seed 0 give the same bits: the base and the last expert (trained from
    its own seed), weights and tokenizer; seed 1 gives another base. What they are built from
    does not depend on the process's string-hash seed."""
    from hotmerge.toy.world import build_facts, vocabulary

    hash_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    there = subprocess.run([sys.executable, "-c", WORLD], env={**os.environ, "PYTHONHASHSEED": hash_seed},
                           capture_output=True, text=True, timeout=120, check=True).stdout
    facts = build_facts(0)
    assert there.strip() == repr((facts, vocabulary(facts)))

    for name, value in FEW_STEPS.items():
        monkeypatch.setattr(build, name, value)
    skill = SKILLS[-1]
    first, again = (build.build_family(tmp_path / name, seed=0, log=lambda *_: None, skills=(skill,))
                    for name in ("first", "again"))
    for mine, theirs in [(first.base, again.base), (first.expert(skill), again.expert(skill))]:
        for name in ("model.safetensors", "tokenizer.json"):
            assert _digest(mine, name) == _digest(theirs, name), (mine.name, name)
    other = build.build_family(tmp_path / "other", seed=1, log=lambda *_: None, skills=())
    assert _digest(other.base) != _digest(first.base)


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


VARIANTS = ("mc", "gen")


@pytest.fixture(scope="module")
def heldout_tables(toy_family, tmp_path_factory):
    """variant -> model -> skill -> held-out score: one mergekit-yaml merge, and each of the
    five models loaded and scored once, on both variants' tasks (one lm-eval call)."""
    merged = _task_arithmetic_merge(toy_family, tmp_path_factory.mktemp("toy_merge") / "merged")
    models = {"base": toy_family.base, "task_arithmetic": merged}
    models |= {f"expert_{s}": toy_family.expert(s) for s in SKILLS}
    tasks = {(variant, s): task_name(s, variant, "heldout") for variant in VARIANTS for s in SKILLS}
    tables = {variant: {} for variant in VARIANTS}
    for name, path in models.items():
        scores = lm_eval_scores(path, list(tasks.values()))
        for (variant, s), task in tasks.items():
            tables[variant].setdefault(name, {})[s] = scores[task]
    return tables


@pytest.mark.slow  # mergekit-yaml, then lm-eval on five models (shared by both variants)
@pytest.mark.parametrize("variant", VARIANTS)
def test_experts_specialise_and_task_arithmetic_combines_them(heldout_tables, variant, capsys):
    table = heldout_tables[variant]
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
