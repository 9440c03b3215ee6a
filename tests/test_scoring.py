"""Scoring with requests built once equals lm_eval.simple_evaluate on the same weights,
for every request type (loglikelihood, generate_until, loglikelihood_rolling)."""

import functools

import numpy as np
import pytest
import yaml

from hotmerge.config.evolve import load_config, validate_config
from hotmerge.run.export import export_merge
from hotmerge.search.worker import CandidateWorker

TASKS = [
    {"name": "toy_sum_mc_search", "metric": "acc,none"},
    {"name": "toy_color_gen_heldout", "metric": "exact_match,none"},
    {"name": "toy_capital_ppl_search", "metric": "word_perplexity,none", "weight": -0.01},
]


@pytest.fixture(scope="module")
def worker(toy_family, tmp_path_factory):
    path = tmp_path_factory.mktemp("scoring") / "toy.yaml"
    path.write_text(yaml.safe_dump({
        "genome": {"models": [str(p) for p in toy_family.experts], "base_model": str(toy_family.base),
                   "merge_method": "ties", "layer_granularity": 2},
        "tasks": TASKS, "apply_chat_template": True, "fewshot_as_multiturn": True}))
    return CandidateWorker(validate_config(load_config(path)))


@functools.cache
def full_task_manager():
    """lm-eval's TaskManager as `lm_eval --include_path` builds it: lm-eval's own ~14,000 task
    files indexed too (15-20 s), where hotmerge indexes only the folders that hold its tasks."""
    from lm_eval.tasks import TaskManager

    from hotmerge.toy.taskfiles import TASKS_DIR

    return TaskManager(include_path=str(TASKS_DIR))


def simple_evaluate(model_dir) -> dict:
    import lm_eval

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=bfloat16",
                                  tasks=[t["name"] for t in TASKS], batch_size=64, device="cpu",
                                  task_manager=full_task_manager())
    return out["results"]


@pytest.mark.slow
def test_scores_equal_simple_evaluate_on_the_exported_merge(worker, tmp_path):
    genome = worker.genome
    for x in (genome.x0(), np.random.default_rng(3).uniform(0.1, 1.0, genome.size)):
        mine = worker.evaluate(x)
        assert mine["error"] is None
        theirs = simple_evaluate(export_merge(worker.runtime_config, x, tmp_path / "merged"))
        for task in TASKS:
            name = task["name"]
            for metric, value in mine["results"][name].items():
                assert theirs[name][metric] == pytest.approx(value, rel=1e-9), (name, metric)
        expected = sum(t.get("weight", 1.0) * mine["results"][t["name"]][t["metric"]] for t in TASKS)
        assert mine["score"] == pytest.approx(expected)


def test_apply_a_b_a_gives_a_exactly(worker):
    genome = worker.genome
    a, b = genome.x0(), np.random.default_rng(4).uniform(0.1, 1.0, genome.size)
    first = worker.evaluate(a)
    other = worker.evaluate(b)
    again = worker.evaluate(a)
    assert again["results"] == first["results"] and again["score"] == first["score"]
    assert other["results"] != first["results"]


def test_chat_template_is_skipped_when_the_tokenizer_has_none(worker):
    # The config asks for a chat template; the toy tokenizer has none, so prompts stay plain.
    instance = worker.suite.requests["loglikelihood"][0]
    assert instance.arguments[0] == instance.doc["question"]


class BundledTasksIndexed(Exception):
    pass


def test_bundled_tasks_are_indexed_only_when_a_task_needs_them(monkeypatch, tmp_path):
    """Plain tasks found in the include paths resolve from those folders alone; a group, a tag
    or a task that only lm-eval ships needs lm-eval's own index."""
    import lm_eval.tasks

    from hotmerge.scoring.suite import task_manager

    real = lm_eval.tasks.TaskManager

    def manager(*args, include_defaults=True, **kwargs):
        if include_defaults:
            raise BundledTasksIndexed
        return real(*args, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", manager)
    local = task_manager([t["name"] for t in TASKS])
    assert {t["name"] for t in TASKS} <= set(local.all_subtasks) and len(local.all_tasks) < 100
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump({
        "group": "toy_pair", "task": ["toy_sum_mc_search", "toy_color_mc_search"]}))
    for names, paths in ((["toy_pair"], [tmp_path]), (["toy_mc"], []), (["hellaswag"], []),
                         (["toy_sum_mc_search", "hellaswag"], [])):
        with pytest.raises(BundledTasksIndexed):
            task_manager(names, paths)


@pytest.mark.slow
def test_suite_built_from_lm_evals_full_index_scores_the_same(worker, monkeypatch):
    """The same tasks from the full index (lm-eval's own tasks too): the same requests, and
    the same scores bit for bit."""
    from hotmerge.scoring import suite as scoring

    cfg = worker.runtime_config.config
    monkeypatch.setattr(scoring, "task_manager", lambda names, include_paths=(): full_task_manager())
    suite = scoring.TaskSuite(cfg.tasks, limit=cfg.limit, num_fewshot=cfg.num_fewshot, shuffle=cfg.shuffle,
                              apply_chat_template=cfg.apply_chat_template,
                              fewshot_as_multiturn=cfg.fewshot_as_multiturn, lm=worker.runtime.lm)
    for kind, requests in worker.suite.requests.items():
        assert [r.arguments for r in suite.requests[kind]] == [r.arguments for r in requests], kind
    x = np.random.default_rng(5).uniform(0.1, 1.0, worker.genome.size)
    mine = worker.evaluate(x)
    theirs = suite.evaluate(worker.runtime.lm)  # the weights of x are still in place
    assert theirs.results == mine["results"] and theirs.score == mine["score"]


def test_raced_rounds_add_up_to_the_full_evaluation(worker):
    """Scoring a candidate round by round (racing) gives the plain evaluation's numbers, for
    loglikelihood and generate_until tasks, with lm-eval's filters and process_results."""
    from hotmerge.config.evolve import TaskConfig
    from hotmerge.errors import ConfigError
    from hotmerge.scoring.suite import TaskSuite
    from hotmerge.search.racing import Race, RacePlan

    with pytest.raises(ConfigError, match="word_perplexity with weighted_perplexity"):
        worker.suite.check_per_item_means()
    # two specs on one task: its documents are scored once, both metrics read from them
    specs = [TaskConfig(**t) for t in TASKS[:2]] + [TaskConfig(name=TASKS[1]["name"], metric="exact_match,none",
                                                                weight=0.5)]
    suite = TaskSuite(specs, lm=worker.runtime.lm)
    suite.check_per_item_means()
    x = worker.genome.x0()
    worker.runtime.apply(worker.genome.decode(x))
    full = suite.evaluate(worker.runtime.lm)
    plan = RacePlan(suite.doc_counts, (0.3, 0.6, 1.0), seed=7)
    race = Race(plan, [(s.name, s.metric, s.weight) for s in specs], 1, 1, 0.05, generation=2)
    for round_ in range(plan.rounds):
        race.add(0, round_, suite.item_values(worker.runtime.lm, plan.positions(2, round_)))
    score, stderr, results = race.scores(0)
    assert score == full.score and stderr == pytest.approx(full.stderr, rel=1e-12)
    # a round may hold none of a task's documents (the pool is shuffled as one)
    some = suite.item_values(worker.runtime.lm, {specs[0].name: [0, 1], specs[1].name: []})
    assert [len(some[s]) for s in range(len(specs))] == [2, 0, 0]
    for spec in specs:
        assert results[spec.name][spec.metric] == full.results[spec.name][spec.metric]
