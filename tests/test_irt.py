"""IRT anchor fitness (search/irt.py): the item model's fit, its anchors, an estimate whose
stated error holds, and the search loop's calibration, estimates and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hotmerge.config.evolve import IrtConfig
from hotmerge.errors import ConfigError
from hotmerge.run.evolve import resume_search
from hotmerge.run.storage import RunDir, best_record
from hotmerge.search import irt
from hotmerge.search.coordinator import Coordinator, Fitness
from hotmerge.search.strategy import Search
from test_racing import DOCS, GENES, SPECS, KnownWorker

TOTAL = sum(DOCS.values())
IRT = Fitness(irt=IrtConfig(anchors=40, calibration_generations=1, recalibrate_every=3), specs=SPECS, seed=1)


def _respond(rng, a, b, theta):
    return (rng.uniform(size=len(a)) < irt._sigmoid(a * (theta - b))).astype(float)


@pytest.fixture(scope="module")
def fitted():
    """A two-parameter logistic pool of 600 items, 24 calibrated candidates, 60 anchors."""
    rng = np.random.default_rng(0)
    a, b = np.exp(rng.normal(0, 0.4, 600)), rng.normal(0, 1.2, 600)
    thetas = rng.normal(0, 0.5, 24)
    fa, fb, ftheta = irt.fit_items(np.stack([_respond(rng, a, b, t) for t in thetas]))
    return a, b, thetas, irt.ItemModel(fa, fb, irt.choose_anchors(fa, fb, 60, seed=0)), ftheta


def test_fit_recovers_the_items_and_the_abilities(fitted):
    a, b, thetas, model, ftheta = fitted
    assert np.corrcoef(model.b, b)[0, 1] > 0.85 and np.corrcoef(ftheta, thetas)[0, 1] > 0.9
    assert len(model.anchors) == 60 and len(set(model.anchors.tolist())) == 60
    # anchors spread over the difficulties, not bunched in one place
    assert np.ptp(model.b[model.anchors]) > 0.6 * np.ptp(model.b)


def test_estimate_is_close_and_its_stderr_holds(fitted):
    a, b, _, model, _ = fitted
    rng = np.random.default_rng(1)
    scale = np.ones(len(a))
    errors, z = [], []
    for _ in range(300):
        y = _respond(rng, a, b, rng.normal(0, 0.5))
        score, stderr = irt.estimate(model, scale, y[model.anchors])
        errors.append(score - y.mean())
        z.append((score - y.mean()) / stderr)
    errors, z = np.array(errors), np.array(z)
    # A small bias from 24 calibrated candidates (item parameters shrunk by their priors; it
    # falls to 0.001 at 64), well inside the stated error.
    assert abs(errors.mean()) < 0.4 * np.sqrt((errors ** 2).mean())
    assert 0.88 <= (np.abs(z) < 1.96).mean() <= 0.995  # the stated 95% interval covers about 95%
    # and it beats the plain mean of as many random items
    assert np.sqrt((errors ** 2).mean()) < np.sqrt(0.25 / len(model.anchors))


def test_item_model_round_trips_and_refuses_what_it_did_not_write(fitted, tmp_path):
    model = fitted[3]
    again = irt.ItemModel.from_json(model.to_json(), 600)
    assert np.array_equal(again.a, model.a) and np.array_equal(again.anchors, model.anchors)
    for text in ('{"a": [1], "b": [0], "anchors": [0]}', model.to_json().replace('"anchors": [', '"anchors": [9999, ')):
        with pytest.raises(ValueError):
            irt.ItemModel.from_json(text, 600)
    run = RunDir(tmp_path)
    run.irt_model_file.write_text("{not json")
    with pytest.raises(ConfigError, match="irt.json is not what hotmerge wrote"):
        run.read_irt_model(600)


def _coordinator(run_dir, worker, fevals=64) -> Coordinator:
    run = RunDir(run_dir)
    run.path.mkdir(exist_ok=True)
    search = resume_search(run, lambda: Search(np.full(GENES, 0.5), 0.2, 1, fevals, 16), fevals)
    return Coordinator(run, search, worker, fevals, lambda record: None, genotype_size=GENES,
                       log=lambda *_: None, fitness=IRT)


def test_irt_run_calibrates_then_estimates_from_the_anchors(tmp_path):
    coordinator = _coordinator(tmp_path / "run", KnownWorker())
    coordinator.run_loop()
    run = RunDir(tmp_path / "run")
    records = run.records()
    means = [r for r in records if r["index"] == -1]  # CMA-ES's mean, scored in full within its share
    records = [r for r in records if r["index"] >= 0]
    assert len(records) == 64 and coordinator.search.generation == 4
    by_generation = {g: [r for r in records if r["generation"] == g] for g in range(4)}
    # generations 0 and 3 calibrate (the first, then every third): scored in full, item by item
    for g in (0, 3):
        for r in by_generation[g]:
            assert r["fitness"] == "full" and r["items"] == TOTAL and r["told"] == r["score"]
            assert r["score"] == pytest.approx(KnownWorker().evaluate(np.asarray(r["genotype"]))["score"])
    assert all("irt_estimate" in r and r["irt_stderr"] > 0 for r in by_generation[3])  # the bias, on record
    for g in (1, 2):
        for r in by_generation[g]:
            assert r["fitness"] == "irt" and r["told"] == r["score"] and r["stderr"] >= 0
            assert r["items"] == 40
    assert len(run.read_irt_rows()) == 32
    model = run.read_irt_model(TOTAL)
    assert len(model.anchors) == 40
    assert means and all(1 <= r["generation"] <= 3 and r["fitness"] == "full" and r["items"] == TOTAL for r in means)
    assert all(r["score"] == pytest.approx(KnownWorker().evaluate(np.asarray(r["genotype"]))["score"]) for r in means)
    assert best_record(records + means)["fitness"] == "full"  # never an estimate


def test_killed_irt_run_resumes_to_the_same_end(tmp_path):
    reference = _coordinator(tmp_path / "reference", KnownWorker())
    reference.run_loop()
    for fail_after in (7, 20, 15):
        killed = _coordinator(tmp_path / "run", KnownWorker(fail_after=fail_after))
        killed.run_loop()
        assert killed.stop_requested

    resumed = _coordinator(tmp_path / "run", KnownWorker())
    resumed.run_loop()

    def outcome(path):
        return sorted((r["generation"], r["index"], tuple(r["genotype"]), r["score"], r["items"])
                      for r in RunDir(path).records())

    assert outcome(tmp_path / "run") == outcome(tmp_path / "reference")
    assert (tmp_path / "run" / "irt.json").read_text() == (tmp_path / "reference" / "irt.json").read_text()
    assert np.array_equal(resumed.search.xfavorite, reference.search.xfavorite)
    assert json.loads((tmp_path / "run" / "irt.json").read_text())["anchors"]
