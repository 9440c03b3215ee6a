"""Score whole model folders on the toy tasks with lm-eval's own HF model class.

This is the reference measurement of the toy family (no merging involved).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hotmerge.toy.taskfiles import TASKS_DIR
from hotmerge.toy.world import SKILLS


def lm_eval_scores(model_path: str | Path, tasks: list[str], batch_size: int = 64) -> dict[str, float]:
    """task -> its primary metric (acc or exact_match), measured by lm_eval.simple_evaluate."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_path},dtype=bfloat16",
        tasks=tasks,
        task_manager=manager,
        batch_size=batch_size,
        device="cpu",
        log_samples=False,
        verbosity="ERROR",
    )
    scores = {}
    for task in tasks:
        metrics = out["results"][task]
        key = "acc,none" if "acc,none" in metrics else "exact_match,none"
        scores[task] = float(metrics[key])
    return scores


def skill_table(models: dict[str, Path], split: str, variant: str) -> dict[str, dict[str, float]]:
    """model name -> skill -> metric, for one split and task variant."""
    from hotmerge.toy.taskfiles import task_name

    tasks = {skill: task_name(skill, variant, split) for skill in SKILLS}
    table = {}
    for name, path in models.items():
        scores = lm_eval_scores(path, list(tasks.values()))
        table[name] = {skill: scores[task] for skill, task in tasks.items()}
    return table
