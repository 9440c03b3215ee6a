"""What every rank holds: a resident runtime and the task suite; it scores one genotype at a time."""

from __future__ import annotations

import math
import time
import traceback

import numpy as np

from hotmerge.config.evolve import ValidatedConfig
from hotmerge.errors import BUG, CANDIDATE, CandidateError, candidate_error_types
from hotmerge.runtimes import start_runtime
from hotmerge.scoring.suite import TaskSuite

# A traceback travels to rank 0 inside a fixed-size message: keep its tail.
MAX_TRACEBACK_CHARS = 32_000


class CandidateWorker:
    def __init__(self, validated: ValidatedConfig, *, backend: str = "hf", device: str | None = None,
                 batch_size: int | None = None, seed: int = 0, task_paths: list[str] = (),
                 tensor_parallel_size: int = 1):
        cfg = validated.config
        self.runtime_config = validated
        self.genome = validated.genome()
        self.candidate_errors = candidate_error_types()
        started = time.perf_counter()
        self.runtime = start_runtime(validated, backend=backend, device=device, batch_size=batch_size,
                                     seed=seed, tensor_parallel_size=tensor_parallel_size)
        try:
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
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - started

    def close(self) -> None:
        self.runtime.close()

    def _score(self, recipe, seconds: dict, started: float) -> dict:
        self.runtime.apply(recipe)
        seconds["apply"] = time.perf_counter() - started
        scores = self.suite.evaluate(self.runtime.lm)
        seconds.update(scores.seconds)
        if not math.isfinite(scores.score):
            raise CandidateError(f"the merged model's score is {scores.score}")
        return {"score": scores.score, "stderr": scores.stderr, "results": scores.results, "error": None}

    def evaluate(self, x, *, raise_bugs: bool = False) -> dict:
        """Score one genotype (or a recipe already resolved, such as a merge config's).

        A candidate error (errors.py: a non-finite merge, a model whose metrics are
        not finite) comes back as a result with score None, the error and failure
        "candidate". Any other exception is a bug: with raise_bugs it propagates;
        otherwise it comes back with failure "bug" and its traceback, for the
        coordinator to record and count.
        """
        seconds = {}
        started = time.perf_counter()
        params = None
        try:
            if isinstance(x, np.ndarray):
                params = {k: v.tolist() for k, v in self.genome.param_values(x).items()}
                recipe = self.genome.decode(x)
            else:
                recipe = x
            result = self._score(recipe, seconds, started)
        except self.candidate_errors as error:
            result = {"score": None, "results": None, "failure": CANDIDATE, "error": _describe(error)}
        except Exception as error:
            if raise_bugs:
                raise
            text = traceback.format_exc()
            if len(text) > MAX_TRACEBACK_CHARS:
                text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
            result = {"score": None, "results": None, "failure": BUG, "error": _describe(error),
                      "traceback": text}
        seconds["total"] = time.perf_counter() - started
        return {**result, "params": params, "seconds": seconds}


def _describe(error: BaseException) -> str:
    """One line: the exception's type, message and where it was raised."""
    message = " ".join(str(error).split())
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {message}{where}"
