"""The search loop: rank 0 runs CMA-ES, every rank evaluates candidates.

Work comes in jobs: score a candidate on the search tasks (CMD_EVAL), on a span of the
generation's pool order (CMD_ITEMS: a racing round, search/racing.py, a subset,
search/subsets.py, or the whole pool item by item), on chosen pool items (CMD_POOL_ITEMS:
IRT's anchors, search/irt.py), or on the held-out tasks (CMD_HELDOUT).
Single process: the loop does every job itself. Under torchrun (gloo process group),
rank 0 keeps one dispatcher thread per other rank, each handing its rank the next job
as soon as it is free, while rank 0's main thread does jobs too. Messages are
fixed-size tensors: a header and a genotype out, a JSON result back.

A generation: its candidates are scored (all of them, or raced in rounds), then the
chosen ones are re-scored on the held-out tasks (Fitness.heldout), then CMA-ES is told.
With subsets or IRT, CMA-ES's mean is scored (subsets: on `mean_items` of the pool, the
same items every time) before a generation is asked, as often as `full_share` allows: the
candidates' estimates never choose best_config.yaml, the means' scores do. At the end of a
run with held-out tasks, CMA-ES's mean is scored on both task sets.

Every finished evaluation is appended to the run's history before anything else
happens, and what CMA-ES was told is appended to the state file after every generation
(search/strategy.py), so a run killed at any moment resumes with no finished evaluation
lost: a resumed run replays the told generations, asks CMA-ES for the next one again and
takes the results it already has. Every history record holds `told`, the value CMA-ES was
told for it (score units, higher is better): the score itself, except in a race
(search/racing.py, Race.told).

Failures (errors.py): a candidate error is recorded and scored worst. A bug
(any other exception in a candidate) is recorded too, with its traceback in the run
directory's errors/ folder; when one rank, rank 0 included, raises bugs for
MAX_BUGS_IN_A_ROW candidates in a row, no more candidates are handed out, the
generation is left untold, and the run stops with its state saved. A resumed run
asks that generation again and evaluates its candidates that met a bug again, so once
the bug is fixed the search goes on as if they had never failed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist

from hotmerge.errors import BUG
from hotmerge.search import irt
from hotmerge.search.racing import Race
from hotmerge.search.strategy import Search, told_values
from hotmerge.search.subsets import SubsetSize, reevaluations, subset_estimate
from hotmerge.search.scores import choice_score

RESULT_BYTES = 1 << 18
CMD_STOP, CMD_EVAL, CMD_ITEMS, CMD_HELDOUT, CMD_POOL_ITEMS = 0.0, 1.0, 2.0, 3.0, 4.0
HEADER = 6  # command, candidate index, generation, round, start, stop; the genotype follows
MAX_BUGS_IN_A_ROW = 3
XFAVORITE_INDEX = -1  # the history index of CMA-ES's mean, scored under the generation it samples
# The pool order whose first items CMA-ES's mean is scored on with `mean_items` below 1: one
# fixed order (RacePlan.order's key), apart from every generation's.
MEAN_ITEMS_ORDER = 2**31 - 1


class RunStore(Protocol):
    """What the search writes and reads in its run directory (run/storage.py's RunDir)."""

    path: Path
    history_file: Path

    def records(self) -> list[dict]: ...
    def append_history(self, record: dict) -> None: ...
    def append_told(self, generation: int, told: list[float], seconds: float, subsets: dict | None = None) -> None: ...
    def read_race(self) -> list[dict]: ...
    def append_race(self, record: dict) -> None: ...
    def clear_race(self) -> None: ...
    def append_irt_row(self, row: dict) -> None: ...
    def read_irt_rows(self) -> list[dict]: ...
    def save_irt_model(self, model) -> None: ...
    def read_irt_model(self, pool: int): ...
    def save_traceback(self, name: str, text: str) -> Path: ...


@dataclass(frozen=True)
class Job:
    """One unit of work for a rank: score candidate `index` (genotype x) in one way."""

    command: float
    index: int
    x: np.ndarray
    generation: int = 0
    round: int = 0
    start: int = 0  # CMD_ITEMS: the span of the generation's pool order to score
    stop: int = 0
    items: tuple[int, ...] = ()  # CMD_POOL_ITEMS: indices into the pool's canonical order


def run_job(worker, job: Job) -> dict:
    """Do `job` on this process's worker (search/worker.py)."""
    if job.command == CMD_EVAL:
        return worker.evaluate(job.x)
    if job.command == CMD_ITEMS:
        return worker.evaluate_items(job.x, job.generation, job.start, job.stop)
    if job.command == CMD_HELDOUT:
        return worker.evaluate_heldout(job.x)
    if job.command == CMD_POOL_ITEMS:
        return worker.evaluate_pool_items(job.x, list(job.items))
    raise ValueError(f"unknown command {job.command}")


@dataclass(frozen=True)
class Fitness:
    """How candidates are scored beyond one plain evaluation each."""

    racing: "RacingConfig | None" = None  # config.evolve.RacingConfig
    subsets: "SubsetsConfig | None" = None  # config.evolve.SubsetsConfig
    irt: "IrtConfig | None" = None  # config.evolve.IrtConfig
    seed: int = 0  # the run's seed (IRT's anchor choice)
    heldout: bool = False  # re-score on the held-out tasks
    heldout_top_k: int | None = None  # None: each new best
    specs: tuple = ()  # (task, weight) of the search tasks, for racing


@dataclass
class BugStop:
    """Why the coordinator stopped handing out candidates: bugs in a row on one rank."""

    rank: int
    count: int
    error: str
    traceback_file: Path | None


@dataclass
class Progress:
    """What the display shows; updated by the loop."""

    max_fevals: int
    evaluations: int = 0
    generation: int = 0
    best_score: float | None = None
    best_stderr: float | None = None  # the best score's standard error, when its metrics have one
    last_score: float | None = None
    failures: int = 0
    started: float = field(default_factory=time.time)
    new_evaluations: int = 0  # this process's, for the rate

    @property
    def per_minute(self) -> float:
        elapsed = time.time() - self.started
        return 60.0 * self.new_evaluations / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.per_minute
        if rate <= 0:
            return None
        return 60.0 * max(0, self.max_fevals - self.evaluations) / rate


def distributed_context() -> tuple[int, int]:
    """(rank, world size); initialises the gloo group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # torchrun's agent keeps one store across restarts of the group: keys from an
        # earlier attempt (the gloo addresses of dead ranks) would still be there, and
        # a restarted rank would try to connect to them. Each attempt gets its own keys.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"hotmerge/attempt_{attempt}", store)
        dist.init_process_group(backend="gloo", store=store, rank=rank, world_size=world)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def may_score_mean(cost: int, scored: int, estimated: int, share: float) -> bool:
    """Whether CMA-ES's mean may be scored for the (scored + 1)-th time, after `scored`
    scorings of `cost` documents each and `estimated` documents of estimates.

    In a long run scoring the mean keeps within `share` of the documents. Early on that rule
    alone would put off the first choice for generations (at a quarter, until the estimates
    cost three scorings), so the k-th scoring (k = 0, 1, ...) may also come once the
    estimates have cost 2^k scorings: the means then take at most half of the documents, a
    third by eight scorings, and less from then on."""
    spent = estimated + scored * cost
    return cost * (scored + 1) <= share * (spent + cost) or estimated >= cost * 2 ** scored


def same_genotype(a, b) -> bool:
    return np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float))


class Coordinator:
    """Rank 0's loop. `worker` (search/worker.py) scores candidates on this process."""

    def __init__(self, run: RunStore, search: Search, worker, max_fevals: int, on_result: Callable[[dict], None],
                 world_size: int = 1, genotype_size: int = 0, log: Callable[[str], None] = print,
                 fitness: Fitness = Fitness(), on_heldout: Callable[[dict], None] = lambda record: None):
        self.run = run
        self.search = search
        self.worker = worker
        self.max_fevals = max_fevals
        self.on_result = on_result
        self.on_heldout = on_heldout
        self.world_size = world_size
        self.genotype_size = genotype_size
        self.log = log
        self.fitness = fitness
        self.stop_requested = False
        self.history = {(r["generation"], r["index"]): r for r in run.records()}
        self.progress = Progress(max_fevals=max_fevals,
                                 evaluations=sum(1 for key in self.history if key[1] != XFAVORITE_INDEX))
        for record in self.history.values():
            self._track(record)
        self.race_cache = {(r["generation"], r["index"], r["round"]): r for r in run.read_race()
                           if r["generation"] >= search.generation}
        self.subset_size = None
        if fitness.subsets is not None:
            self.subset_size = SubsetSize(worker.race_plan, fitness.subsets, genotype_size,
                                          **(search.subset_state or {}))
        self.irt_model = None
        if fitness.irt is not None:
            self.irt_model = run.read_irt_model(worker.race_plan.total)
        self._lock = threading.Lock()
        self.bugs_in_a_row: dict[int, int] = {}
        self.bug_stop: BugStop | None = None

    def _track(self, record: dict) -> None:
        score = record.get("score")
        self.progress.last_score = score
        if score is None:
            self.progress.failures += 1
        value = choice_score(record)  # a candidate's estimate on part of the items is never the best
        if value is not None and (self.progress.best_score is None or value > self.progress.best_score):
            self.progress.best_score = value
            self.progress.best_stderr = record.get("stderr")

    def run_loop(self) -> None:
        try:
            while not self.stop_requested and not self.search.done(self.progress.evaluations, self.max_fevals):
                if (self.fitness.subsets is not None or self.fitness.irt is not None) \
                        and not self._score_mean(self.search.generation):
                    break
                candidates = self.search.ask()
                generation = self.search.generation
                self.progress.generation = generation
                if self.fitness.racing is not None:
                    told = self._race_generation(generation, candidates)
                elif self.fitness.subsets is not None:
                    told = self._subset_generation(generation, candidates)
                elif self.fitness.irt is not None:
                    told = self._irt_generation(generation, candidates)
                else:
                    told = self._evaluate_generation(generation, candidates)
                if told is None:  # stopped mid-generation; state stays at the last whole one
                    break
                if self.fitness.heldout and not self._rescore_heldout(generation, len(candidates)):
                    break
                self.search.tell(candidates, told)
                subsets = self.subset_size.state if self.subset_size is not None else None
                self.run.append_told(generation, told, self.search.elapsed, subsets=subsets)
                if self.fitness.racing is not None or self.fitness.subsets is not None or self.fitness.irt is not None:
                    self.run.clear_race()
                    self.race_cache.clear()
            if self.fitness.heldout and not self.stop_requested and self.bug_stop is None:
                self._score_xfavorite()
        finally:
            self._stop_workers()

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, jobs: list[Job], finish: Callable[[Job, dict, int], None]) -> bool:
        """Run `jobs` on every rank, each rank taking the next job as soon as it is free;
        `finish(job, result, rank)` runs under the lock. True when every job finished and
        no bug stopped the run."""
        todo = deque(jobs)
        finished = []

        def take() -> Job | None:
            with self._lock:
                if self.stop_requested or not todo:
                    return None
                return todo.popleft()

        def done(job: Job, result: dict, rank: int) -> None:
            with self._lock:
                finish(job, result, rank)
                finished.append(job)

        threads = [threading.Thread(target=self._feed_rank, args=(rank, take, done), daemon=True)
                   for rank in range(1, self.world_size)]
        for thread in threads:
            thread.start()
        try:
            while (job := take()) is not None:
                done(job, run_job(self.worker, job), 0)
        except KeyboardInterrupt:
            # Ctrl-C: let the other ranks finish what they hold, then stop cleanly.
            self.stop_requested = True
        for thread in threads:
            thread.join()
        return len(finished) == len(jobs) and self.bug_stop is None

    def _feed_rank(self, rank: int, take, done) -> None:
        while (job := take()) is not None:
            done(job, self._remote(rank, job), rank)

    def _remote(self, rank: int, job: Job) -> dict:
        """Have `rank` do `job`; its result dict."""
        message = torch.zeros(HEADER + self.genotype_size, dtype=torch.float64)
        message[:HEADER] = torch.tensor([job.command, job.index, job.generation, job.round, job.start, job.stop],
                                        dtype=torch.float64)
        message[HEADER:] = torch.from_numpy(job.x)
        if job.command == CMD_POOL_ITEMS:
            message[5] = len(job.items)  # the items follow in a second message
        dist.send(message, dst=rank)
        if job.command == CMD_POOL_ITEMS:
            dist.send(torch.tensor(job.items, dtype=torch.int64), dst=rank)
        reply = torch.zeros(RESULT_BYTES, dtype=torch.uint8)
        dist.recv(reply, src=rank)
        return _decode_result(reply)

    def _stop_workers(self) -> None:
        if self.world_size <= 1:
            return
        message = torch.zeros(HEADER + self.genotype_size, dtype=torch.float64)
        message[0] = CMD_STOP
        for rank in range(1, self.world_size):
            dist.send(message, dst=rank)

    # -- records ----------------------------------------------------------------------------

    def _done_before(self, generation: int, index: int, x) -> dict | None:
        """The history's record of this candidate, when a killed run finished it."""
        old = self.history.get((generation, index))
        # A bug says nothing about the candidate: a resumed run evaluates it again.
        if old is not None and old.get("failure") != BUG and same_genotype(old["genotype"], x):
            return old
        return None

    def _finish(self, generation: int, index: int, x, result: dict, rank: int) -> dict:
        """Record one candidate's result (under the lock): history first, then the rest."""
        record = {"generation": generation, "index": index, "rank": rank,
                  "genotype": np.asarray(x).tolist(), **result, "finished_at": time.time()}
        self._record_bug(record)
        self.run.append_history(record)
        if (generation, index) not in self.history and index != XFAVORITE_INDEX:
            self.progress.evaluations += 1  # a bug evaluated again counts once
        self.history[(generation, index)] = record
        self.progress.new_evaluations += 1
        self._track(record)
        self.on_result(record)
        return record

    def _evaluate_generation(self, generation: int, candidates: list[np.ndarray]) -> list | None:
        records: dict[int, dict] = {}
        jobs = []
        for index, x in enumerate(candidates):
            old = self._done_before(generation, index, x)
            if old is not None:
                records[index] = old
            else:
                jobs.append(Job(CMD_EVAL, index, x, generation))

        def finish(job: Job, result: dict, rank: int) -> None:
            told, = told_values([result.get("score")])
            records[job.index] = self._finish(generation, job.index, job.x,
                                              {**result, "fitness": "full", "told": told}, rank)

        self._dispatch(jobs, finish)
        if self.bug_stop is not None or len(records) < len(candidates):
            return None  # not told: a resumed run evaluates what is missing (bugs included)
        return told_values([records[i].get("score") for i in range(len(candidates))])

    # -- racing -----------------------------------------------------------------------------

    def _race_generation(self, generation: int, candidates: list[np.ndarray]) -> list | None:
        """Score a generation by racing (search/racing.py); the values to tell, or None when
        stopped. The history gets each candidate's record when it stops or finishes, then a
        second line with `told` once the race is over. Every round's values are kept in
        race.jsonl, so a resumed run replays the rounds it has and decides exactly as the
        killed run did."""
        plan = self.worker.race_plan
        race = Race(plan, list(self.fitness.specs), len(candidates), self.search.mu, self.fitness.racing.delta,
                    generation)
        seconds: dict[int, dict] = {}
        last: dict[int, dict] = {}  # index -> the last round's result (rank, params, failure)
        records: dict[int, dict] = {}

        def take_round(index: int, round_: int, result: dict, rank: int) -> None:
            failed = result.get("failure") is not None
            race.add(index, round_, None if failed else {int(k): v for k, v in result["values"].items()})
            for key, value in (result.get("seconds") or {}).items():
                seconds.setdefault(index, {})[key] = seconds.get(index, {}).get(key, 0.0) + value
            last[index] = {**result, "rank": rank}

        for round_ in range(plan.rounds):
            jobs = []
            for index in race.racing():
                cached = self.race_cache.get((generation, index, round_))
                if cached is not None and same_genotype(cached["genotype"], candidates[index]):
                    take_round(index, round_, cached["result"], cached["rank"])
                else:
                    jobs.append(Job(CMD_ITEMS, index, candidates[index], generation, round_, *plan.cut(round_)))

            def finish(job: Job, result: dict, rank: int) -> None:
                if result.get("failure") == BUG:
                    # Recorded like a plain bug; the round is not kept, so a resume runs it again.
                    take_round(job.index, job.round, result, rank)
                    records[job.index] = self._finish(generation, job.index, job.x,
                                                      self._race_result(race, job.index, last[job.index],
                                                                        seconds[job.index]), rank)
                    return
                self._keep_round(job, result, rank)
                take_round(job.index, job.round, result, rank)

            if not self._dispatch(jobs, finish):
                return None  # not told: a resumed run replays the rounds kept and runs the rest
            race.decide()
            for index, entry in enumerate(race.entries):
                if index in records or (index in race.racing()):
                    continue
                old = self._done_before(generation, index, candidates[index])
                if old is not None:
                    records[index] = old
                    continue
                with self._lock:
                    records[index] = self._finish(generation, index, candidates[index],
                                                  self._race_result(race, index, last[index], seconds[index]),
                                                  last[index]["rank"])
        told = race.told()
        with self._lock:
            for index, value in enumerate(told):
                if records[index].get("told") != value:  # a resumed run may have written it already
                    record = {**records[index], "told": value}
                    self.run.append_history(record)
                    self.history[(generation, index)] = record
        return told

    def _keep_round(self, job: Job, result: dict, rank: int) -> None:
        """Keep one round's (or subset's) result in race.jsonl, for an exact resume."""
        entry = {"generation": job.generation, "index": job.index, "round": job.round, "rank": rank,
                 "genotype": job.x.tolist(), "result": result}
        self.run.append_race(entry)
        self.race_cache[(job.generation, job.index, job.round)] = entry

    def _race_result(self, race: Race, index: int, last: dict, seconds: dict) -> dict:
        """A raced candidate's history fields: scores on the items it saw, as lm-eval
        aggregates them (a finished candidate's equal a plain evaluation's)."""
        entry = race.entries[index]
        common = {"fitness": "raced", "params": last.get("params"), "seconds": seconds,
                  "items": race.items_seen(index),
                  "stopped_early": entry.stopped is not None, "race": entry.stopped}
        if entry.failed:
            failure = {"score": None, "results": None, "failure": last.get("failure"), "error": last.get("error")}
            if "traceback" in last:
                failure["traceback"] = last["traceback"]
            return {**failure, **common}
        score, stderr, results = race.scores(index)
        return {"score": score, "stderr": stderr, "results": results, "error": None, **common}

    # -- subsets ----------------------------------------------------------------------------

    def _subset_generation(self, generation: int, candidates: list[np.ndarray]) -> list | None:
        """Score a generation on one shared random subset (search/subsets.py); its first
        candidates again on a second one, which adapts the size. The values to tell, or None
        when stopped. Partial results are kept in race.jsonl, as racing's rounds are, so a
        resumed run scores the same items and decides the same size."""
        plan = self.worker.race_plan
        n = self.subset_size.items
        spans = {0: (0, n), 1: (n, 2 * n)}  # round 1: the re-scoring's disjoint subset
        again = reevaluations(len(candidates))
        specs = [(task, weight) for task, _, weight in self.fitness.specs]
        results: dict[tuple[int, int], dict] = {}
        records: dict[int, dict] = {}
        jobs = []
        for index, x in enumerate(candidates):
            old = self._done_before(generation, index, x)
            if old is not None:
                records[index] = old
                continue
            for round_ in ((0, 1) if index < again else (0,)):
                cached = self.race_cache.get((generation, index, round_))
                if cached is not None and same_genotype(cached["genotype"], x):
                    results[(index, round_)] = {**cached["result"], "rank": cached["rank"]}
                else:
                    jobs.append(Job(CMD_ITEMS, index, x, generation, round_, *spans[round_]))

        def estimate(index: int, round_: int) -> tuple[float, float]:
            values = {int(k): v for k, v in results[(index, round_)]["values"].items()}
            return subset_estimate(plan, specs, generation, *spans[round_], values)

        def record_if_done(index: int) -> None:
            rounds = (0, 1) if index < again else (0,)
            if index in records or any((index, r) not in results for r in rounds):
                return
            first = results[(index, 0)]
            failed = next((results[(index, r)] for r in rounds if results[(index, r)].get("failure")), None)
            common = {"fitness": "subset", "span": list(spans[0]), "params": first.get("params"),
                      "seconds": first.get("seconds"), "items": n * len(rounds)}
            if failed is not None:
                result = {"score": None, "stderr": None, "results": None, "failure": failed.get("failure"),
                          "error": failed.get("error"), **common}
                if "traceback" in failed:
                    result["traceback"] = failed["traceback"]
            else:
                score, stderr = estimate(index, 0)
                result = {"score": score, "stderr": stderr, "results": None, "error": None, **common}
                if len(rounds) == 2:
                    again_score, again_stderr = estimate(index, 1)
                    result["reevaluation"] = {"score": again_score, "stderr": again_stderr, "span": list(spans[1])}
            result["told"], = told_values([result["score"]])
            records[index] = self._finish(generation, index, candidates[index], result, first.get("rank", 0))

        def finish(job: Job, result: dict, rank: int) -> None:
            if result.get("failure") != BUG:  # a bug is not kept: a resumed run scores it again
                self._keep_round(job, result, rank)
            results[(job.index, job.round)] = {**result, "rank": rank}
            record_if_done(job.index)

        for index in range(len(candidates)):
            record_if_done(index)
        if not self._dispatch(jobs, finish) or len(records) < len(candidates):
            return None
        told = [records[i]["told"] for i in range(len(candidates))]
        self.subset_size.update(told, {i: records[i]["reevaluation"]["score"] for i in range(again)
                                       if records[i].get("reevaluation") is not None})
        return told

    def _score_mean(self, generation: int) -> bool:
        """Score CMA-ES's mean, the one `generation` is sampled from (what it learnt from every
        generation told so far), when may_score_mean allows it; False when stopped.

        A candidate's estimate is never the best, and the best of λ noisy estimates is mostly
        the one that luck favoured (the winner's curse). The mean recombines the μ best and
        averages their noise away: pycma's `xfavorite`, its current best estimate of the
        optimum. It is scored in full, or on the same `mean_items` of the pool every time
        (subsets, _mean_job), and that score is a history record of its own (index
        XFAVORITE_INDEX, `xfavorite`), among which best_config.yaml chooses. Each scoring
        costs many candidates' estimates: may_score_mean says when the next one may come.
        Every quantity comes from the history, so a resumed run decides the same."""
        x = np.asarray(self.search.xfavorite, dtype=float)
        if self._done_before(generation, XFAVORITE_INDEX, x) is not None:
            return True
        share = (self.fitness.subsets or self.fitness.irt).full_share
        records = [r for (g, _), r in self.history.items() if g < generation]  # as the generation starts
        scored = sum(1 for r in records if r.get("xfavorite"))
        estimated = sum(r.get("items", 0) for r in records if not r.get("xfavorite"))
        job, fields = self._mean_job(generation, x)
        if not may_score_mean(fields["items"], scored, estimated, share):
            return True

        def finish(job: Job, result: dict, rank: int) -> None:
            self._finish(generation, XFAVORITE_INDEX, x, self._mean_result(result, fields), rank)

        return self._dispatch([job], finish)

    def _mean_job(self, generation: int, x: np.ndarray) -> tuple[Job, dict]:
        """The job that scores CMA-ES's mean, and its record's fields: in full, or with subsets
        and `mean_items` below 1 on that share of the pool, the first items of one fixed
        random order (MEAN_ITEMS_ORDER; whole forward batches): every mean on the same items,
        so their comparison is paired, and its estimate carries its standard error
        (search/subsets.py's estimate, for sampling without replacement)."""
        plan = self.worker.race_plan
        subsets = self.fitness.subsets
        if subsets is None or subsets.mean_items >= 1:  # IRT's calibration candidates are full scores too
            fields = {"fitness": "full", "xfavorite": True}
            return Job(CMD_EVAL, XFAVORITE_INDEX, x, generation), \
                fields if plan is None else {**fields, "items": plan.total}
        n = plan.whole_batches(subsets.mean_items * plan.total)
        return Job(CMD_ITEMS, XFAVORITE_INDEX, x, MEAN_ITEMS_ORDER, 0, 0, n), \
            {"fitness": "subset", "xfavorite": True, "items": n, "span": [0, n], "order": "mean"}

    def _mean_result(self, result: dict, fields: dict) -> dict:
        """A mean's job result as its history record's fields."""
        if fields["fitness"] == "full" or result.get("failure") is not None:
            return {**result, **fields}
        specs = [(task, weight) for task, _, weight in self.fitness.specs]
        values = {int(k): v for k, v in result.pop("values").items()}
        score, stderr = subset_estimate(self.worker.race_plan, specs, MEAN_ITEMS_ORDER, *fields["span"], values)
        return {**result, "score": score, "stderr": stderr, "results": None, "error": None, **fields}

    # -- IRT anchors -------------------------------------------------------------------------

    def _calibrates(self, generation: int) -> bool:
        """Whether this generation is scored in full to (re)fit the item model."""
        config = self.fitness.irt
        return self.irt_model is None or generation < config.calibration_generations \
            or generation % config.recalibrate_every == 0

    def _irt_scale(self) -> np.ndarray:
        """Each pool item's c at m = 1, (N / N_t) w_t, in canonical order (search/irt.py)."""
        plan = self.worker.race_plan
        weight = {task: w for task, _, w in self.fitness.specs}
        return np.array([plan.total / plan.doc_counts[task] * weight[task] for task, _ in plan.pool])

    def _pool_row(self, generation: int, start: int, values: dict) -> list[float]:
        """One candidate's per-item values, in the pool's canonical order, from a job's values
        per spec (one spec per task) over items start.. of the generation's order."""
        plan = self.worker.race_plan
        spec_of = {task: s for s, (task, _, _) in enumerate(self.fitness.specs)}
        index_of = {item: k for k, item in enumerate(plan.pool)}
        row = [0.0] * plan.total
        positions = plan.span_positions(generation, start, plan.total)
        for task, docs in positions.items():
            for doc, value in zip(docs, values[str(spec_of[task])]):
                row[index_of[(task, doc)]] = float(value)
        return row

    def _irt_generation(self, generation: int, candidates: list[np.ndarray]) -> list | None:
        """Score a generation with IRT anchors (search/irt.py): in full, item by item, when it
        calibrates the item model; else on the anchors, told each candidate's estimate. The
        values to tell, or None when stopped."""
        plan = self.worker.race_plan
        calibrating = self._calibrates(generation)
        model = self.irt_model
        anchors = tuple(model.anchors.tolist()) if model is not None else ()
        scale = self._irt_scale()
        records: dict[int, dict] = {}
        jobs = []
        for index, x in enumerate(candidates):
            old = self._done_before(generation, index, x)
            if old is not None:
                records[index] = old
            elif calibrating:
                jobs.append(Job(CMD_ITEMS, index, x, generation, 0, 0, plan.total))
            else:
                jobs.append(Job(CMD_POOL_ITEMS, index, x, generation, items=anchors))

        def finish(job: Job, result: dict, rank: int) -> None:
            common = {"params": result.get("params"), "seconds": result.get("seconds")}
            if result.get("failure") is not None:
                record = {**result, "score": None, "stderr": None, "results": None,
                          "fitness": "full" if calibrating else "irt"}
            elif calibrating:
                row = self._pool_row(generation, 0, result["values"])
                self.run.append_irt_row({"generation": generation, "index": job.index, "values": row})
                race = Race(plan, list(self.fitness.specs), len(candidates), self.search.mu, 0.05, generation)
                race.add(job.index, 0, {int(k): v for k, v in result["values"].items()})
                score, stderr, results = race.scores(job.index)
                record = {"score": score, "stderr": stderr, "results": results, "error": None, "fitness": "full",
                          "items": plan.total, **common}
                if model is not None:  # the estimate the current model would give: its bias, measured
                    values = np.asarray(row)[model.anchors]
                    record["irt_estimate"], record["irt_stderr"] = irt.estimate(model, scale, values)
            else:
                pool = plan.pool
                by_task = {task: list(vs) for task, vs in
                           ((self.fitness.specs[int(k)][0], v) for k, v in result["values"].items())}
                values = np.array([by_task[pool[i][0]].pop(0) for i in anchors])
                score, stderr = irt.estimate(model, scale, values)
                record = {"score": score, "stderr": stderr, "results": None, "error": None, "fitness": "irt",
                          "items": len(anchors), **common}
            record.pop("values", None)
            record["told"], = told_values([record["score"]])
            records[job.index] = self._finish(generation, job.index, job.x, record, rank)

        if not self._dispatch(jobs, finish) or len(records) < len(candidates):
            return None
        told = [records[i]["told"] for i in range(len(candidates))]
        if calibrating:
            self._fit_irt(generation)
        return told

    def _fit_irt(self, generation: int) -> None:
        """Refit the item model on every calibrated candidate so far and choose its anchors."""
        rows = {(r["generation"], r["index"]): r["values"] for r in self.run.read_irt_rows()
                if r["generation"] <= generation}
        responses = np.array([rows[key] for key in sorted(rows)])
        a, b, _ = irt.fit_items(responses)
        anchors = irt.choose_anchors(a, b, self.fitness.irt.anchors, seed=self.fitness.seed + generation)
        self.irt_model = irt.ItemModel(a, b, anchors)
        self.run.save_irt_model(self.irt_model)

    # -- held-out re-scoring ----------------------------------------------------------------

    def _heldout_choice(self, generation: int, size: int) -> list[dict]:
        """The records to score on the held-out tasks: the generation's top k, or the best
        record so far (records best_config.yaml may be chosen from: scores.choice_score)."""
        if self.fitness.heldout_top_k is not None:
            mine = [self.history[(generation, i)] for i in range(size)
                    if choice_score(self.history.get((generation, i), {})) is not None]
            mine.sort(key=lambda r: (-choice_score(r), r["index"]))
            return mine[:self.fitness.heldout_top_k]
        scored = [r for (g, i), r in self.history.items() if g <= generation and choice_score(r) is not None]
        return [min(scored, key=lambda r: (-choice_score(r), r["generation"], r["index"]))] if scored else []

    def _rescore_heldout(self, generation: int, size: int) -> bool:
        """Score the chosen records on the held-out tasks; False when stopped."""
        chosen = [r for r in self._heldout_choice(generation, size) if "heldout_score" not in r]
        jobs = [Job(CMD_HELDOUT, r["index"], np.asarray(r["genotype"]), r["generation"]) for r in chosen]

        def finish(job: Job, result: dict, rank: int) -> None:
            self._take_heldout((job.generation, job.index), result, rank)

        return self._dispatch(jobs, finish)

    def _take_heldout(self, key: tuple[int, int], result: dict, rank: int) -> None:
        """Add a held-out result to its record. A failure (a bug too: it is counted and its
        traceback kept) leaves heldout_score None with the error; the search goes on."""
        bug = {"generation": key[0], "index": key[1], "rank": rank, **result}
        self._record_bug(bug)
        record = {**self.history[key]}
        record["heldout_score"] = result.get("heldout_score")
        record["heldout_stderr"] = result.get("heldout_stderr")
        record["heldout_results"] = result.get("heldout_results")
        if result.get("failure") is not None:
            record["heldout_error"] = result.get("error")
            if "traceback_file" in bug:
                record["heldout_traceback_file"] = bug["traceback_file"]
        self.run.append_history(record)
        self.history[key] = record
        self.on_heldout(record)

    def _score_xfavorite(self) -> None:
        """Score CMA-ES's own estimate of the optimum, its mean, on both task sets."""
        generation = self.search.generation
        x = np.asarray(self.search.xfavorite, dtype=float)
        key = (generation, XFAVORITE_INDEX)
        record = self._done_before(generation, XFAVORITE_INDEX, x)
        if record is None:
            job, fields = self._mean_job(generation, x)  # as the run's other means: comparable with them
            result = self._mean_result(run_job(self.worker, job), fields)
            record = self._finish(generation, XFAVORITE_INDEX, x, result, 0)
            if record.get("failure") == BUG:
                return
        if "heldout_score" not in record:
            self._take_heldout(key, run_job(self.worker, Job(CMD_HELDOUT, XFAVORITE_INDEX, x)), 0)

    # -- bugs -------------------------------------------------------------------------------

    def _record_bug(self, record: dict) -> None:
        """Keep a bug's traceback in the run directory and count bugs in a row per rank."""
        rank = record["rank"]
        text = record.pop("traceback", None)
        if record.get("failure") != BUG:
            self.bugs_in_a_row[rank] = 0
            return
        path = None
        if text:
            name = f"g{record['generation']:04d}-c{record['index']:03d}-r{rank}.txt"
            path = self.run.save_traceback(name, text)
            record["traceback_file"] = str(path.relative_to(self.run.path))
        count = self.bugs_in_a_row.get(rank, 0) + 1
        self.bugs_in_a_row[rank] = count
        where = f"; traceback in {path}" if path is not None else ""
        self.log(f"bug in candidate {record['index']} of generation {record['generation']} on rank {rank}: "
                 f"{record.get('error')}{where}")
        if count >= MAX_BUGS_IN_A_ROW and self.bug_stop is None:
            self.bug_stop = BugStop(rank=rank, count=count, error=str(record.get("error")), traceback_file=path)
            self.stop_requested = True


def worker_loop(worker, genotype_size: int) -> None:
    """Ranks other than 0: do what rank 0 sends until it says stop."""
    while True:
        message = torch.zeros(HEADER + genotype_size, dtype=torch.float64)
        dist.recv(message, src=0)
        if message[0].item() == CMD_STOP:
            return
        command, index, generation, round_, start, stop = (message[i].item() for i in range(HEADER))
        items = ()
        if command == CMD_POOL_ITEMS:
            received = torch.zeros(int(stop), dtype=torch.int64)
            dist.recv(received, src=0)
            items = tuple(received.tolist())
        job = Job(command, int(index), message[HEADER:].numpy().copy(), int(generation), int(round_), int(start),
                  int(stop), items)
        dist.send(_encode_result(run_job(worker, job)), dst=0)


def broadcast_text(text: str | None, world_size: int) -> str | None:
    """Rank 0's `text` on every rank (a collective: every rank calls it)."""
    if world_size <= 1:
        return text
    buffer = _encode_result({"text": text}) if dist.get_rank() == 0 else torch.zeros(RESULT_BYTES, dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    return _decode_result(buffer)["text"]


def _encode_result(result: dict[str, Any]) -> torch.Tensor:
    data = json.dumps(result, default=float).encode()
    if len(data) + 4 > RESULT_BYTES:
        data = json.dumps({"score": None, "failure": BUG,
                           "error": f"the result is too large to send ({len(data)} bytes)"}).encode()
    buffer = torch.zeros(RESULT_BYTES, dtype=torch.uint8)
    buffer[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
    buffer[4:4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buffer


def _decode_result(buffer: torch.Tensor) -> dict[str, Any]:
    raw = bytes(buffer.numpy())
    length = int.from_bytes(raw[:4], "little")
    return json.loads(raw[4:4 + length])
