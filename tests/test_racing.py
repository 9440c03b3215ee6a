"""Racing (search/racing.py) and held-out re-scoring in the search loop, on a worker whose
per-item scores are a known function of the genotype: the race's decisions, its record
fields, an exact resume, and which records the held-out tasks re-score."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from hotmerge.config.evolve import RacingConfig
from hotmerge.search.coordinator import XFAVORITE_INDEX, Coordinator, Fitness
from hotmerge.search.racing import INSIDE, OUTSIDE, Race, RacePlan, betting_evidence
from hotmerge.search.strategy import Search
from hotmerge.run.evolve import resume_search
from hotmerge.run.storage import RunDir

DOCS = {"a": 300, "b": 200}
SPECS = (("a", "acc,none", 1.0), ("b", "acc,none", 2.0))
SCHEDULE = (0.125, 0.25, 0.5, 1.0)
GENES = 3


def test_plan_rounds_split_the_pool_into_its_documents_once():
    plan = RacePlan({"a": 103, "b": 7}, SCHEDULE, seed=1)
    for generation in (0, 1):
        rounds = [plan.positions(generation, r) for r in range(plan.rounds)]
        for task, count in plan.doc_counts.items():
            seen = [p for r in rounds for p in r[task]]
            assert sorted(seen) == list(range(count))
        assert [len(r["a"]) + len(r["b"]) for r in rounds] == [14, 14, 27, 55]  # ceil of the shares of 110
        # round 0 is the start of the pool's one order, and each task's documents keep it
        order = plan.order(generation)
        assert {(t, d) for t, docs in rounds[0].items() for d in docs} == set(order[:14])
        assert plan.task_orders(generation)["b"] == [d for t, d in order if t == "b"]
    assert plan.positions(0, 0) == RacePlan({"a": 103, "b": 7}, SCHEDULE, seed=1).positions(0, 0)
    assert plan.positions(0, 0) != plan.positions(1, 0)  # a new order every generation


def test_rounds_are_whole_batches_of_the_runtime():
    eighths = tuple((k + 1) / 8 for k in range(8))
    assert RacePlan({"a": 180, "b": 180, "c": 180}, eighths, seed=0, batch=64).ends == (
        64, 128, 192, 256, 320, 384, 448, 540)
    # shares that round to the same batch (or to none) make one round
    plan = RacePlan({"a": 100}, eighths, seed=0, batch=64)
    assert plan.ends == (64, 100) and plan.rounds == 2
    assert [len(plan.positions(0, r)["a"]) for r in range(plan.rounds)] == [64, 36]
    assert RacePlan({"a": 30}, eighths, seed=0, batch=64).ends == (30,)


def _paired(wins: int, losses: int, size: int, seed: int = 0) -> np.ndarray:
    """Paired differences mapped to [0, 1] (1 a win, 0 a loss, 1/2 a tie), shuffled."""
    x = np.array([1.0] * wins + [0.0] * losses + [0.5] * (size - wins - losses))
    return np.random.default_rng(seed).permutation(x)


@pytest.mark.parametrize("wins,losses", [(5, 5), (60, 60), (30, 31)])
def test_evidence_against_a_true_null_reaches_one_over_delta_rarely(wins, losses):
    """When the pool mean is at most 1/2 (no better), the capital reaches 1/δ at some item
    count in at most a δ share of random orders."""
    rng = np.random.default_rng(0)
    pool = _paired(wins, losses, 300)
    x = np.stack([pool[rng.permutation(300)] for _ in range(1000)])
    evidence = betting_evidence(x, 300)  # the highest capital over every item count
    for delta in (0.05, 0.2):
        assert (evidence >= math.log(1 / delta)).mean() <= delta


def test_evidence_needs_far_fewer_items_than_hoeffding_when_candidates_mostly_agree():
    # 100 of 500 items, 12 wins and 1 loss, the rest ties: a clear lead that the
    # Hoeffding-Serfling bound, knowing only the range, cannot separate from a tie
    x = _paired(12, 1, 100)
    width = math.sqrt(math.log(1 / 0.05) * (1 - 99 / 500) / (2 * 100))
    assert x.mean() - width < 0.5
    assert betting_evidence(x[None], 500)[0] >= math.log(1 / 0.05)
    # ties alone, or a lead that chance explains, are no evidence
    assert betting_evidence(np.full((1, 100), 0.5), 500)[0] == 0.0
    assert betting_evidence(_paired(6, 4, 100)[None], 500)[0] < math.log(1 / 0.05)
    # the finite pool: having seen most of it, a small lead is certain
    almost = _paired(20, 10, 499)
    assert betting_evidence(almost[None], 500)[0] >= math.log(1 / 0.05)


def test_racing_config_has_the_betting_test_only():
    from pydantic import ValidationError

    assert RacingConfig().test == "betting"
    for removed in ("normal", "t-test"):
        with pytest.raises(ValidationError, match="only the betting test"):
            RacingConfig(test=removed)


def _values(quality: float, positions: dict[str, list[int]]) -> dict[int, list[float]]:
    """Item i of a task is right when its fixed difficulty is below the candidate's quality:
    a better candidate gets every item a worse one gets, and more (paired items)."""
    out = {}
    for s, (task, _, _) in enumerate(SPECS):
        difficulty = np.random.default_rng(len(task)).uniform(size=DOCS[task])
        out[s] = [float(difficulty[p] < quality) for p in positions[task]]
    return out


def _race(qualities, mu, delta=0.05):
    plan = RacePlan(DOCS, SCHEDULE, seed=0)
    race = Race(plan, list(SPECS), len(qualities), mu, delta, generation=0)
    for round_ in range(plan.rounds):
        for i in race.racing():
            race.add(i, round_, _values(qualities[i], plan.positions(0, round_)))
        race.decide()
    return race


def test_race_stops_clear_losers_and_winners_and_the_leader_finishes():
    qualities = [0.9, 0.1, 0.85, 0.15, 0.2, 0.8, 0.05, 0.88]
    race = _race(qualities, mu=4)
    stopped = {i: e.stopped for i, e in enumerate(race.entries)}
    assert {i for i, s in stopped.items() if s == OUTSIDE} == {1, 3, 4, 6}
    assert stopped[0] is None  # the leader finishes
    assert {i for i, s in stopped.items() if s == INSIDE} <= {2, 5, 7}
    assert all(race.items_seen(i) < sum(DOCS.values()) for i, s in stopped.items() if s is not None)
    assert race.items_seen(0) == sum(DOCS.values())


def test_race_among_equals_stops_nobody():
    race = _race([0.5] * 6, mu=3)
    assert all(e.stopped is None and e.rounds == len(SCHEDULE) for e in race.entries)


def test_race_full_scores_equal_a_plain_evaluation():
    race = _race([0.4, 0.45], mu=1)
    score, stderr, results = race.scores(1)
    everything = {task: list(range(n)) for task, n in DOCS.items()}
    values = _values(0.45, everything)
    assert score == sum(w * np.mean(values[s]) for s, (_, _, w) in enumerate(SPECS))
    assert results["b"]["acc,none"] == np.mean(values[1])
    assert stderr > 0


# -- the search loop with a worker whose scores are known -----------------------------------------


class KnownWorker:
    """Quality = 1 - distance of the genotype to an optimum; item values as _values."""

    def __init__(self, racing: bool = True, fail_after: int | None = None):
        self.race_plan = RacePlan(DOCS, SCHEDULE, seed=0) if racing else None
        self.calls = 0
        self.fail_after = fail_after

    def _tick(self):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # a kill in the middle of a generation

    @staticmethod
    def quality(x) -> float:
        return float(np.clip(1.0 - np.abs(np.asarray(x) - 0.7).sum(), 0.0, 1.0))

    def evaluate(self, x) -> dict:
        self._tick()
        values = _values(self.quality(x), {task: list(range(n)) for task, n in DOCS.items()})
        score = sum(w * float(np.mean(values[s])) for s, (_, _, w) in enumerate(SPECS))
        return {"score": score, "stderr": 0.01, "results": {}, "error": None, "params": None, "seconds": {}}

    def evaluate_items(self, x, generation, start, stop) -> dict:
        self._tick()
        values = _values(self.quality(x), self.race_plan.span_positions(generation, start, stop))
        return {"values": {str(k): v for k, v in values.items()}, "error": None, "params": None,
                "seconds": {"forward": 1.0}}

    def evaluate_pool_items(self, x, items) -> dict:
        self._tick()
        values = _values(self.quality(x), self.race_plan.pool_positions(items))
        return {"values": {str(k): v for k, v in values.items()}, "error": None, "params": None,
                "seconds": {"forward": 1.0}}

    def evaluate_heldout(self, x) -> dict:
        self._tick()
        return {"heldout_score": self.quality(x) - 0.05, "heldout_stderr": 0.02, "heldout_results": {},
                "error": None, "params": None, "seconds": {}}


def _coordinator(run_dir: Path, worker, fitness: Fitness, fevals: int = 48) -> Coordinator:
    run = RunDir(run_dir)
    run.path.mkdir(exist_ok=True)
    search = resume_search(run, lambda: Search(np.full(GENES, 0.5), 0.2, 1, fevals, 16), fevals)
    return Coordinator(run, search, worker, fevals, lambda record: None, genotype_size=GENES,
                       log=lambda *_: None, fitness=fitness)


RACING = Fitness(racing=RacingConfig(), specs=SPECS)


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def _outcome(run_dir: Path) -> list:
    return sorted((r["generation"], r["index"], tuple(r["genotype"]), r["score"], r.get("stopped_early"),
                   r.get("items"), r.get("heldout_score")) for r in RunDir(run_dir).records())


def test_racing_run_flags_stopped_candidates_and_saves_items(tmp_path):
    coordinator = _coordinator(tmp_path / "race", KnownWorker(), RACING)
    coordinator.run_loop()
    records = RunDir(tmp_path / "race").records()
    assert len(records) == 48 and coordinator.search.generation == 3
    total = sum(DOCS.values())
    stopped = [r for r in records if r["stopped_early"]]
    assert stopped and all(r["items"] < total and r["race"] in (INSIDE, OUTSIDE) for r in stopped)
    finished = [r for r in records if not r["stopped_early"]]
    assert finished and all(r["items"] == total and r["race"] is None for r in finished)
    for r in finished:  # a finished candidate's score is a plain evaluation's
        assert r["score"] == pytest.approx(KnownWorker().evaluate(np.asarray(r["genotype"]))["score"], abs=1e-12)
    # the best is a fully scored candidate
    best = max(records, key=lambda r: r["score"])
    assert coordinator.progress.best_score == max(r["score"] for r in finished)
    assert best["score"] >= coordinator.progress.best_score
    items = sum(r["items"] for r in records)
    assert items < 0.8 * len(records) * total  # the race saved items


def test_killed_racing_run_resumes_to_the_same_end(tmp_path):
    reference = _coordinator(tmp_path / "reference", KnownWorker(), RACING)
    reference.run_loop()
    # Kill in the middle of rounds, in the first and in later generations, then resume.
    for fail_after in (20, 30, 25):
        killed = _coordinator(tmp_path / "run", KnownWorker(fail_after=fail_after), RACING)
        killed.run_loop()
        assert killed.stop_requested
    resumed = _coordinator(tmp_path / "run", KnownWorker(), RACING)
    resumed.run_loop()
    assert _outcome(tmp_path / "run") == _outcome(tmp_path / "reference")
    assert resumed.search.generation == reference.search.generation


def test_heldout_rescores_each_new_best_and_the_mean(tmp_path):
    coordinator = _coordinator(tmp_path / "run", KnownWorker(racing=False), Fitness(heldout=True))
    coordinator.run_loop()
    lines = _lines(tmp_path / "run")
    rescored = [r for r in lines if "heldout_score" in r]
    records = RunDir(tmp_path / "run").records()
    # every re-scored record is a new best of the search when its generation ended
    best = -math.inf
    for generation in range(3):
        top = max((r for r in records if r["generation"] == generation), key=lambda r: r["score"])
        chosen = [r for r in rescored if r["generation"] == generation and r["index"] != XFAVORITE_INDEX]
        assert len(chosen) == (1 if top["score"] > best else 0)
        if chosen:
            assert chosen[0]["index"] == top["index"]
            assert chosen[0]["heldout_score"] == pytest.approx(KnownWorker.quality(top["genotype"]) - 0.05)
        best = max(best, top["score"])
    mean = [r for r in records if r["index"] == XFAVORITE_INDEX]
    assert len(mean) == 1 and mean[0]["xfavorite"] and mean[0]["heldout_score"] is not None
    assert mean[0]["genotype"] == pytest.approx(coordinator.search.xfavorite.tolist())
    assert coordinator.progress.evaluations == 48  # the mean is not one of the search's evaluations


def test_heldout_top_k_with_racing_rescores_fully_scored_records_only(tmp_path):
    fitness = Fitness(racing=RacingConfig(), specs=SPECS, heldout=True, heldout_top_k=3)
    coordinator = _coordinator(tmp_path / "run", KnownWorker(), fitness)
    coordinator.run_loop()
    records = RunDir(tmp_path / "run").records()
    for generation in range(3):
        mine = [r for r in records if r["generation"] == generation]
        full = sorted((r for r in mine if not r["stopped_early"]), key=lambda r: (-r["score"], r["index"]))
        rescored = {r["index"] for r in mine if "heldout_score" in r}
        assert rescored == {r["index"] for r in full[:3]}


# -- what CMA-ES is told, and the generation's guarantee -------------------------------------------


def _entries(race: Race, values: dict[int, list[float]], stopped: dict[int, str | None]) -> None:
    """Set each candidate's values on the pool's first items (one task) and how it stopped."""
    for index, vs in values.items():
        race.entries[index].values = {0: list(vs)}
        race.entries[index].stopped = stopped.get(index)


def test_told_puts_outside_below_every_finisher_even_when_its_estimate_is_higher():
    plan = RacePlan({"a": 100}, (0.1, 1.0), seed=0)
    race = Race(plan, [("a", "acc,none", 1.0)], 6, mu=2, delta=0.05, generation=0)
    _entries(race, {
        0: [1.0] * 50 + [0.0] * 50,  # finished, 0.5
        1: [1.0] * 60 + [0.0] * 40,  # finished, 0.6: the best finisher
        2: [1.0] * 9 + [0.0] * 1,    # stopped outside on 10 items, estimate 0.9
        3: [1.0] * 4 + [0.0] * 6,    # stopped inside on 10 items, estimate 0.4
        4: [1.0] * 3 + [0.0] * 7,    # stopped outside, 0.3
    }, {2: OUTSIDE, 3: INSIDE, 4: OUTSIDE})
    race.entries[5].failed = True
    told = race.told()
    assert race.estimate(2) > race.estimate(1)  # the raw estimates would rank the outside one first
    ranked = sorted(range(6), key=lambda i: -told[i])
    assert set(ranked[:2]) == {1, 3}  # the race's best μ: the inside one and the best finisher
    assert ranked == [1, 3, 0, 2, 4, 5]
    assert told[1] == race.estimate(1) and told[3] == race.estimate(3)  # the best μ: their estimates
    assert max(told[2], told[4]) < min(told[0], told[1], told[3])
    assert told[5] == min(told)


def _tie_pool(size: int, rng) -> np.ndarray:
    """Per-item values (0/1) of 8 candidates on a pool of `size` items: 2 clearly best, then 4
    exactly tied across the line of the best μ = 4 (each with 30 items the others disagree
    on), then 2 clearly worst."""
    base = (rng.uniform(size=size) < 0.5).astype(float)
    zeros, ones = np.flatnonzero(base == 0), np.flatnonzero(base == 1)
    pool = np.tile(base, (8, 1))
    for i in range(8):
        if i in (0, 1):
            pool[i, zeros[:60 + 10 * i]] = 1.0
        elif i in (6, 7):
            pool[i, ones[-(60 + 10 * i):]] = 0.0
        else:
            pool[i, rng.choice(zeros, 15, replace=False)] = 1.0
            pool[i, rng.choice(ones, 15, replace=False)] = 0.0
    return pool


def _wrong_generations(delta: float, races: int, mu: int = 4) -> float:
    """The share of simulated generations with any wrong decision, racing with the project's
    own Race: a candidate stopped as outside that fewer than μ others beat on the pool, or
    stopped as inside that fewer than λ - μ others are worse than."""
    rng = np.random.default_rng(7)
    size, wrong = 400, 0
    eighths = tuple((k + 1) / 8 for k in range(8))
    for generation in range(races):
        pool = _tie_pool(size, rng)
        sums = pool.sum(axis=1)
        plan = RacePlan({"t": size}, eighths, seed=generation)
        race = Race(plan, [("t", "acc,none", 1.0)], len(pool), mu, delta, generation)
        for round_ in range(plan.rounds):
            positions = plan.positions(generation, round_)["t"]
            for i in race.racing():
                race.add(i, round_, {0: pool[i, positions].tolist()})
            race.decide()
        wrong += any((e.stopped == OUTSIDE and (sums > sums[i]).sum() < mu)
                     or (e.stopped == INSIDE and (sums < sums[i]).sum() < len(pool) - mu)
                     for i, e in enumerate(race.entries))
    return wrong / races


def test_delta_bounds_the_chance_of_any_wrong_decision_in_a_generation():
    races, delta = 150, 0.05
    assert Race(RacePlan({"t": 10}, (1.0,), 0), [("t", "acc,none", 1.0)], 8, 4, delta, 0).threshold == \
        pytest.approx(math.log(8 * 7 / delta))
    rate = _wrong_generations(delta, races)
    assert rate <= delta
    # Each pair at level δ (a generation-wide δ of 56δ, the earlier rule) errs more on these ties.
    assert _wrong_generations(delta * 8 * 7, races) > max(rate, delta)
