"""What every rank holds: a resident runtime and the task suite; it scores one genotype at a time."""

from __future__ import annotations

import time
import traceback

import numpy as np

from hotmerge.engine.config import ValidatedConfig
from hotmerge.engine.scoring import TaskSuite


class CandidateWorker:
    def __init__(self, validated: ValidatedConfig, *, backend: str = "hf", device: str | None = None,
                 batch_size: int | None = None, seed: int = 0, task_paths: list[str] = (),
                 tensor_parallel_size: int = 1):
        cfg = validated.config
        self.runtime_config = validated
        self.genome = validated.genome()
        started = time.perf_counter()
        if backend == "vllm":
            from hotmerge.engine.runtime.vllm import VLLMRuntime

            self.runtime = VLLMRuntime(validated, seed=seed, batch_size=batch_size,
                                       tensor_parallel_size=tensor_parallel_size)
        else:
            from hotmerge.engine.runtime.hf import HFRuntime

            self.runtime = HFRuntime(validated, device=device, batch_size=batch_size, seed=seed)
        self.suite = TaskSuite(
            cfg.tasks,
            include_paths=[*cfg.task_paths, *task_paths],
            limit=cfg.limit,
            num_fewshot=cfg.num_fewshot,
            shuffle=cfg.shuffle,
            seed=seed,
            apply_chat_template=cfg.apply_chat_template,
            fewshot_as_multiturn=cfg.fewshot_as_multiturn,
            lm=self.runtime.lm,
        )
        self.startup_seconds = time.perf_counter() - started

    def evaluate(self, x: np.ndarray) -> dict:
        """Score one genotype. Failures come back as a result with score None and the error."""
        seconds = {}
        started = time.perf_counter()
        params = {k: v.tolist() for k, v in self.genome.param_values(x).items()}
        try:
            recipe = self.genome.decode(x)
            self.runtime.apply(recipe)
            seconds["apply"] = time.perf_counter() - started
            scores = self.suite.evaluate(self.runtime.lm)
            seconds.update(scores.seconds)
            result = {"score": scores.score, "results": scores.results, "error": None}
        except Exception as error:  # a failed candidate must not stop the search
            last = traceback.extract_tb(error.__traceback__)[-1]
            result = {"score": None, "results": None,
                      "error": f"{type(error).__name__}: {error} (at {last.filename}:{last.lineno})"}
        seconds["total"] = time.perf_counter() - started
        return {**result, "params": params, "seconds": seconds}
