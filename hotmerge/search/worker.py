"""What every rank holds: a resident runtime and the task suite; it scores one genotype at a time."""

from __future__ import annotations

import math
import time
import traceback

import numpy as np

from hotmerge.config.evolve import ValidatedConfig
from hotmerge.errors import BUG, CANDIDATE, CandidateError, ConfigError, candidate_error_types
from hotmerge.runtimes import start_runtime
from hotmerge.scoring.suite import TaskSuite
from hotmerge.search.racing import RacePlan

# A traceback travels to rank 0 inside a fixed-size message: keep its tail.
MAX_TRACEBACK_CHARS = 32_000


class CandidateWorker:
    def __init__(self, validated: ValidatedConfig, *, backend: str = "hf", device: str | None = None,
                 batch_size: int | None = None, seed: int = 0, task_paths: list[str] = (),
                 tensor_parallel_size: int = 1, sources: str = "auto", chat_template: str | None = None):
        """chat_template: a merge config's template, which the merged model's tokenizer carries
        (run/export.py), so the requests are built through it."""
        cfg = validated.config
        self.runtime_config = validated
        self.genome = validated.genome()
        self.candidate_errors = candidate_error_types()
        started = time.perf_counter()
        self.runtime = start_runtime(validated, backend=backend, device=device, batch_size=batch_size,
                                     seed=seed, tensor_parallel_size=tensor_parallel_size, sources=sources)
        try:
            if chat_template:
                self.runtime.lm.tokenizer.chat_template = chat_template

            def suite(tasks, **only_search):
                return TaskSuite(tasks, include_paths=[*cfg.task_paths, *task_paths], num_fewshot=cfg.num_fewshot,
                                 seed=seed, apply_chat_template=cfg.apply_chat_template,
                                 fewshot_as_multiturn=cfg.fewshot_as_multiturn, lm=self.runtime.lm, **only_search)

            self.suite = suite(cfg.tasks, limit=cfg.limit, shuffle=cfg.shuffle)
            # The held-out tasks judge the result: every document, in order (limit and
            # shuffle are the search's, as in mergekit-evolve).
            self.heldout_suite = suite(cfg.heldout_tasks) if cfg.heldout_tasks else None
            self.race_plan = None  # the pool's item order, for racing and subsets
            if cfg.racing is not None or cfg.subsets is not None or cfg.irt is not None:
                self.suite.check_per_item_means()
                schedule = tuple(cfg.racing.schedule) if cfg.racing is not None else (1.0,)
                self.race_plan = RacePlan(self.suite.doc_counts, schedule, seed, batch=self.runtime.forward_batch)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - started
        self.applied = None  # the genotype (or recipe) the live weights hold

    def close(self) -> None:
        self.runtime.close()

    def _apply(self, x, seconds: dict, started: float) -> None:
        """Write candidate x into the live weights, unless they already hold it (racing
        scores one candidate in several calls)."""
        if isinstance(x, np.ndarray):
            if isinstance(self.applied, np.ndarray) and np.array_equal(self.applied, x):
                return
            recipe = self.genome.decode(x)
        else:
            recipe = x
        self.applied = None  # a failed apply leaves the weights half written
        self.runtime.apply(recipe)
        self.applied = x.copy() if isinstance(x, np.ndarray) else None
        seconds["apply"] = time.perf_counter() - started

    def _score(self, x, seconds: dict, started: float) -> dict:
        self._apply(x, seconds, started)
        scores = self.suite.evaluate(self.runtime.lm)
        seconds.update(scores.seconds)
        if not math.isfinite(scores.score):
            raise CandidateError(f"the merged model's score is {scores.score}")
        return {"score": scores.score, "stderr": scores.stderr, "results": scores.results, "error": None,
                "items": sum(self.suite.doc_counts.values())}

    def _score_items(self, x, positions: dict[str, list[int]], seconds: dict, started: float) -> dict:
        self._apply(x, seconds, started)
        values = self.suite.item_values(self.runtime.lm, positions)
        seconds["forward"] = time.perf_counter() - started - seconds.get("apply", 0.0)
        for spec, vs in values.items():
            if not all(math.isfinite(v) for v in vs):
                raise CandidateError(f"task {self.suite.specs[spec].name} gave a non-finite item value")
            outside = [v for v in vs if not 0.0 <= v <= 1.0]
            if outside:  # the race's bound assumes the range: a task's property, not the candidate's
                raise ConfigError(f"racing needs per-item values in [0, 1], and task {self.suite.specs[spec].name} "
                                  f"gave {outside[0]}: turn racing and subsets off for this metric")
        return {"values": {str(k): v for k, v in values.items()}, "error": None}

    def _score_heldout(self, x, seconds: dict, started: float) -> dict:
        self._apply(x, seconds, started)
        scores = self.heldout_suite.evaluate(self.runtime.lm)
        seconds.update(scores.seconds)
        if not math.isfinite(scores.score):
            raise CandidateError(f"the merged model's held-out score is {scores.score}")
        return {"heldout_score": scores.score, "heldout_stderr": scores.stderr,
                "heldout_results": scores.results, "error": None}

    def evaluate(self, x, *, raise_bugs: bool = False) -> dict:
        """Score one genotype (or a recipe already resolved, such as a merge config's).

        A candidate error (errors.py: a non-finite merge, a model whose metrics are
        not finite) comes back as a result with score None, the error and failure
        "candidate". Any other exception is a bug: with raise_bugs it propagates;
        otherwise it comes back with failure "bug" and its traceback, for the
        coordinator to record and count.
        """
        return self._guarded(x, self._score, raise_bugs=raise_bugs)

    def evaluate_items(self, x, generation: int, start: int, stop: int) -> dict:
        """The per-item values of the items start..stop of the generation's pool order
        (racing's rounds, search/racing.py; subsets, search/subsets.py)."""
        positions = self.race_plan.span_positions(generation, start, stop)
        return self._guarded(x, lambda x, seconds, started: self._score_items(x, positions, seconds, started))

    def evaluate_pool_items(self, x, items: list[int]) -> dict:
        """The per-item values of the pool items `items` (indices into the pool's canonical
        order: IRT's anchors, search/irt.py), in that order."""
        positions = self.race_plan.pool_positions(items)
        return self._guarded(x, lambda x, seconds, started: self._score_items(x, positions, seconds, started))

    def evaluate_heldout(self, x) -> dict:
        """Score one genotype on the held-out tasks."""
        return self._guarded(x, self._score_heldout)

    def _guarded(self, x, score, *, raise_bugs: bool = False) -> dict:
        seconds = {}
        started = time.perf_counter()
        params = None
        try:
            if isinstance(x, np.ndarray):
                params = {k: v.tolist() for k, v in self.genome.param_values(x).items()}
            result = score(x, seconds, started)
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
