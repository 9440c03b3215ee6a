"""Fitness on adaptive subsets (search/subsets.py): shared fresh subsets, the size that
follows the ranking's noise, the history's fields, CMA-ES's mean scored on its fixed items or
in full, an exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hotmerge.config.evolve import SubsetsConfig
from hotmerge.search.coordinator import MEAN_ITEMS_ORDER, Coordinator, Fitness, may_score_mean
from hotmerge.search.racing import RacePlan
from hotmerge.search.strategy import Search
from hotmerge.search.subsets import SubsetSize, reevaluations, subset_estimate
from hotmerge.run.evolve import resume_search
from hotmerge.run.storage import RunDir, best_record
from test_racing import DOCS, GENES, SPECS, KnownWorker

SUBSETS = Fitness(subsets=SubsetsConfig(), specs=SPECS)
TOTAL = sum(DOCS.values())


def _coordinator(run_dir, worker, fitness=SUBSETS, fevals=96) -> Coordinator:
    run = RunDir(run_dir)
    run.path.mkdir(exist_ok=True)
    search = resume_search(run, lambda: Search(np.full(GENES, 0.5), 0.2, 1, fevals, 16), fevals)
    return Coordinator(run, search, worker, fevals, lambda record: None, genotype_size=GENES,
                       log=lambda *_: None, fitness=fitness)


def test_estimate_is_the_weighted_score_on_the_whole_pool():
    plan = RacePlan(DOCS, (1.0,), seed=0)
    rng = np.random.default_rng(0)
    full = {0: rng.integers(0, 2, DOCS["a"]).astype(float), 1: rng.integers(0, 2, DOCS["b"]).astype(float)}
    order = plan.task_orders(3)
    values = {0: full[0][order["a"]].tolist(), 1: full[1][order["b"]].tolist()}
    estimate, stderr = subset_estimate(plan, [("a", 1.0), ("b", 2.0)], 3, 0, TOTAL, values)
    assert estimate == pytest.approx(full[0].mean() + 2 * full[1].mean()) and stderr == 0.0  # the whole pool
    # on part of it: unbiased over the generations' random subsets
    estimates = []
    for generation in range(400):
        span = plan.span_positions(generation, 0, 50)
        part = {0: full[0][span["a"]].tolist(), 1: full[1][span["b"]].tolist()}
        estimates.append(subset_estimate(plan, [("a", 1.0), ("b", 2.0)], generation, 0, 50, part))
    means = np.array([e for e, _ in estimates])
    assert abs(means.mean() - estimate) < 3 * means.std() / np.sqrt(len(means))
    assert np.mean([s for _, s in estimates]) == pytest.approx(means.std(), rel=0.2)  # the stated error is honest


def test_size_grows_when_the_ranking_is_noisy_and_shrinks_when_not():
    plan = RacePlan(DOCS, (1.0,), seed=0)
    rng = np.random.default_rng(1)
    config = SubsetsConfig(start=0.05)  # above the minimum, so that it can shrink
    noisy, clear = SubsetSize(plan, config, GENES), SubsetSize(plan, config, GENES)
    start = noisy.items
    for _ in range(6):
        told = rng.normal(size=16).tolist()
        noisy.update(told, {i: float(rng.normal()) for i in range(reevaluations(16))})  # ranks reshuffle
        told = list(np.arange(16.0))
        clear.update(told, {i: told[i] + 0.01 for i in range(reevaluations(16))})  # ranks hold
    assert noisy.items > start > clear.items
    assert clear.items >= SubsetsConfig().minimum * TOTAL - 1 and noisy.items <= TOTAL // 2


def _means_sampled(records, generations: int) -> list[np.ndarray]:
    """CMA-ES's mean each generation was sampled from, replayed from what it was told."""
    told = {(r["generation"], r["index"]): r["told"] for r in records if r["index"] >= 0}
    replay = Search(np.full(GENES, 0.5), 0.2, 1, 96, 16)
    means = []
    for generation in range(generations):
        candidates = replay.ask()
        means.append(replay.xfavorite)
        replay.tell(candidates, [told[(generation, i)] for i in range(len(candidates))])
    return means


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("generation_cost", [0.13, 0.6, 1.7])  # in pools
def test_scoring_the_mean_takes_at_most_half_the_documents_and_its_share_in_the_long_run(share, generation_cost):
    cost, estimated, scored, first = 540, 0, 0, None  # documents one scoring of the mean costs
    for generation in range(4000):
        if may_score_mean(cost, scored, estimated, share):
            scored += 1
            first = estimated if first is None else first
            assert scored * cost <= 0.5 * (scored * cost + estimated)
        estimated += round(generation_cost * cost)
    assert cost <= first < cost + round(generation_cost * cost)  # as soon as the estimates cost one scoring
    spent = scored * cost + estimated
    # the share, or one scoring a generation where that is less
    assert min(share, 1 / (1 + generation_cost)) - 2 * cost / spent <= scored * cost / spent <= share + cost / spent


@pytest.mark.parametrize("mean_items", [0.5, 1.0])
def test_subset_run_records_estimates_and_scores_the_mean(tmp_path, mean_items):
    config = SubsetsConfig(mean_items=mean_items)
    coordinator = _coordinator(tmp_path / "run", KnownWorker(), Fitness(subsets=config, specs=SPECS))
    coordinator.run_loop()
    run = RunDir(tmp_path / "run")
    records = run.records()
    estimates = [r for r in records if r["index"] >= 0]
    assert len(estimates) == 96 and coordinator.search.generation == 6
    again = reevaluations(16)
    for r in estimates:
        assert r["fitness"] == "subset" and r["told"] == r["score"] and r["stderr"] >= 0
        n = r["span"][1] - r["span"][0]
        assert r["span"][0] == 0 and 0 < n < TOTAL
        assert ("reevaluation" in r) == (r["index"] < again)
        assert r["items"] == n * (2 if r["index"] < again else 1)
    # CMA-ES's mean, scored under its generation: the recipe that generation was sampled from,
    # in full (a plain evaluation) or on the same fixed items every time, and only the means'
    # scores choose the best
    means = sorted((r for r in records if r["index"] == -1), key=lambda r: r["generation"])
    plan = RacePlan(DOCS, (1.0,), seed=0)
    part = plan.whole_batches(mean_items * TOTAL)
    assert (part == TOTAL) == (mean_items == 1.0)
    assert means and all(r["xfavorite"] and r["items"] == part for r in means)
    sampled = _means_sampled(records, 6)
    for r in means:
        x = np.asarray(r["genotype"])
        assert np.allclose(x, sampled[r["generation"]], rtol=0, atol=1e-12)
        if mean_items == 1.0:
            assert r["fitness"] == "full" and r["score"] == pytest.approx(KnownWorker().evaluate(x)["score"])
        else:
            values = {int(k): v for k, v in KnownWorker().evaluate_items(x, MEAN_ITEMS_ORDER, 0, part)["values"].items()}
            estimate = subset_estimate(plan, [(t, w) for t, _, w in SPECS], MEAN_ITEMS_ORDER, 0, part, values)
            assert r["fitness"] == "subset" and r["span"] == [0, part]
            assert (r["score"], r["stderr"]) == pytest.approx(estimate) and r["stderr"] > 0
    assert best_record(records) is max(means, key=lambda r: r["score"])
    # before each generation, its mean was scored exactly when the rule allowed it
    for generation in range(6):
        before = [r for r in records if r["generation"] < generation]
        scored = sum(1 for r in before if r["index"] == -1)
        estimated = sum(r["items"] for r in before if r["index"] >= 0)
        allowed = may_score_mean(part, scored, estimated, config.full_share)
        assert allowed == any(r["generation"] == generation for r in means)
    assert sum(1 for r in means) > 1
    # every generation told CMA-ES its estimates and kept the size its next subset has
    lines = [json.loads(line) for line in run.search_file.read_text().splitlines()[1:]]
    assert [line["generation"] for line in lines] == list(range(6))
    sizes = [r["span"][1] for r in sorted(estimates, key=lambda r: r["generation"]) if r["index"] == 0]
    assert sizes[0] == RacePlan(DOCS, (1.0,), seed=0).whole_batches(SubsetsConfig().start * TOTAL)
    assert all("items" in line["subsets"] for line in lines)


def test_killed_subset_run_resumes_to_the_same_end(tmp_path):
    reference = _coordinator(tmp_path / "reference", KnownWorker())
    reference.run_loop()
    for fail_after in (10, 20, 12):
        killed = _coordinator(tmp_path / "run", KnownWorker(fail_after=fail_after))
        killed.run_loop()
        assert killed.stop_requested
    resumed = _coordinator(tmp_path / "run", KnownWorker())
    resumed.run_loop()

    def outcome(path):
        return sorted((r["generation"], r["index"], tuple(r["genotype"]), r["score"], r.get("span"), r["items"])
                      for r in RunDir(path).records())

    assert outcome(tmp_path / "run") == outcome(tmp_path / "reference")
    assert (tmp_path / "run" / "search.jsonl").read_text() == (tmp_path / "reference" / "search.jsonl").read_text() \
        or _same_told(tmp_path)
    assert np.array_equal(resumed.search.xfavorite, reference.search.xfavorite)


def _same_told(tmp_path) -> bool:
    """The state files agree in everything but the seconds between ask and tell."""
    def told(path):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (path / "search.jsonl").read_text().splitlines()]

    return told(tmp_path / "run") == told(tmp_path / "reference")


def test_racing_and_subsets_together_are_refused():
    from pydantic import ValidationError

    from hotmerge.config.evolve import EvolveConfig

    with pytest.raises(ValidationError, match="keep one of them"):
        EvolveConfig(genome={"models": ["a", "b"], "merge_method": "linear"}, tasks=["t"], racing=True, subsets=True)
    with pytest.raises(ValidationError):
        SubsetsConfig(start=0.6)


def test_toy_pool_tasks_ask_every_search_fact_with_other_distractors(tmp_path):
    from hotmerge.toy.taskfiles import write_pool_tasks
    from hotmerge.toy.world import build_facts

    names = write_pool_tasks(tmp_path, 2000, seed=0)
    docs = {name: [json.loads(line) for line in (tmp_path / f"pool_{name.split('_')[2]}_search.jsonl").open()]
            for name in names}
    assert sum(len(d) for d in docs.values()) >= 2000
    search = {f.prompt: f.answer for f in build_facts(0) if f.split == "search"}
    for rows in docs.values():
        assert all(row["question"] in search and row["choices"][row["label"]] == search[row["question"]]
                   for row in rows)
    capital = docs["toy_pool_capital_mc_search"]
    first = [row for row in capital if row["question"] == capital[0]["question"]]
    assert len(first) > 1 and len({tuple(row["choices"]) for row in first}) > 1  # asked again, other options
    assert (tmp_path / "toy_pool_capital_mc_search.yaml").is_file() and (tmp_path / "toydata.py").is_file()


def test_heldout_rescores_each_new_best_mean_under_its_own_record(tmp_path):
    fitness = Fitness(subsets=SubsetsConfig(full_share=0.45), specs=SPECS, heldout=True)
    coordinator = _coordinator(tmp_path / "run", KnownWorker(), fitness, fevals=160)
    coordinator.run_loop()
    records = RunDir(tmp_path / "run").records()
    last = coordinator.search.generation  # the final mean, scored on both task sets at the end
    means = sorted((r for r in records if r["index"] == -1 and r["generation"] < last), key=lambda r: r["generation"])
    rescored = [r for r in records if "heldout_score" in r and r["generation"] < last]
    # each mean's full score that became the best so far, and only those, has a held-out score on its own record
    best, new_bests = -np.inf, []
    for r in means:
        if r["score"] > best:
            new_bests.append((r["generation"], r["index"]))
            best = r["score"]
    assert len(new_bests) > 1 and sorted((r["generation"], r["index"]) for r in rescored) == new_bests
    assert all(r["heldout_score"] == pytest.approx(KnownWorker.quality(r["genotype"]) - 0.05) for r in rescored)
    final = [r for r in records if r["generation"] == last]
    assert [r["index"] for r in final] == [-1] and "heldout_score" in final[0]
