"""Score whole model folders on the family tasks with lm-eval's own HF model class.

This is the reference measurement of the model families (no merging involved).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hotmerge.toy.taskfiles import TASKS_DIR


def lm_eval_metrics(model_path: str | Path, tasks: list[str], batch_size: int = 64,
                    apply_chat_template: bool = False, dtype: str = "bfloat16") -> dict[str, tuple[float, float]]:
    """task -> (its primary metric (acc or exact_match), its standard error), by lm_eval.simple_evaluate."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from hotmerge.scoring.lm_eval_compat import quiet_progress_bars

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    # The model simple_evaluate builds from model="hf", model_args="pretrained=...,dtype=...",
    # built here to turn off its progress bars (lm-eval's evaluator asks for them).
    lm = HFLM(pretrained=str(model_path), dtype=dtype, batch_size=batch_size, device="cpu")
    quiet_progress_bars(lm)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        apply_chat_template=apply_chat_template,
        log_samples=False,
        verbosity="ERROR",
    )
    scores = {}
    for task in tasks:
        metrics = out["results"][task]
        name = "acc" if "acc,none" in metrics else "exact_match"
        scores[task] = (float(metrics[f"{name},none"]), float(metrics[f"{name}_stderr,none"]))
    return scores


def lm_eval_scores(model_path: str | Path, tasks: list[str], batch_size: int = 64,
                   apply_chat_template: bool = False) -> dict[str, float]:
    """task -> its primary metric (acc or exact_match), measured by lm_eval.simple_evaluate."""
    metrics = lm_eval_metrics(model_path, tasks, batch_size, apply_chat_template)
    return {task: value for task, (value, _) in metrics.items()}
