"""The run directory as a trust boundary: the search state is data replayed through CMA-ES,
never unpickled, and files changed between runs are refused in one line."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hotmerge.errors import ConfigError
from hotmerge.run.evolve import resume_search
from hotmerge.run.storage import RunDir
from hotmerge.search.strategy import Search, told_values

GENES, POPSIZE, FEVALS = 4, 6, 60


def _fresh() -> Search:
    return Search(np.full(GENES, 0.5), 0.3, 3, FEVALS, POPSIZE)


def _score(x) -> float | None:
    x = np.asarray(x)
    return None if x[0] > 0.9 else -float(np.sum((x - 0.2) ** 2))  # some candidates fail


def _run(run: RunDir, search: Search, generations: int) -> Search:
    """Ask, score and tell `generations` generations, keeping history and state as the
    coordinator does."""
    for _ in range(generations):
        generation = search.generation
        candidates = search.ask()
        told = told_values([_score(x) for x in candidates])
        for index, (x, value) in enumerate(zip(candidates, told)):
            run.append_history({"generation": generation, "index": index, "genotype": x.tolist(),
                                "score": None if value == told_values([None])[0] else value, "told": value})
        search.tell(candidates, told)
        run.append_told(generation, told, search.elapsed)
    return search


def test_replayed_state_equals_the_uninterrupted_search(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    uninterrupted = _run(run, resume_search(run, _fresh, FEVALS), 6)
    resumed = resume_search(run, _fresh, FEVALS)
    assert resumed.generation == uninterrupted.generation == 6
    a, b = uninterrupted.strategy, resumed.strategy
    assert a.sigma == b.sigma and a.countiter == b.countiter and a.countevals == b.countevals
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.C, b.C) and np.array_equal(a.pc, b.pc)
    # the next generation's samples, and the end of the run, are identical
    assert all(np.array_equal(x, y) for x, y in zip(uninterrupted.ask(), resumed.ask()))
    other = RunDir(tmp_path / "other")
    other.path.mkdir()
    end = _run(other, resume_search(other, _fresh, FEVALS), 10)
    half = RunDir(tmp_path / "half")
    half.path.mkdir()
    _run(half, resume_search(half, _fresh, FEVALS), 4)
    end_resumed = _run(half, resume_search(half, _fresh, FEVALS), 6)
    assert np.array_equal(end.xfavorite, end_resumed.xfavorite) and end.strategy.sigma == end_resumed.strategy.sigma
    assert half.search_file.read_text().count("\n") == 11  # the start and ten told generations
    assert not list(half.path.glob("*.pkl"))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _planted(tmp_path: Path) -> tuple[RunDir, Path]:
    run = RunDir(tmp_path / "shared")
    run.path.mkdir()
    run.meta_file.write_text(json.dumps({"config": {}, "seed": 0}))
    marker = tmp_path / "payload-ran"
    run.legacy_search_file.write_bytes(pickle.dumps(_Payload(marker)))
    return run, marker


def test_an_older_pickled_state_is_refused_and_never_loaded(tmp_path):
    run, marker = _planted(tmp_path)
    with pytest.raises(ConfigError, match="never loaded.*delete it"):
        run.check_path()
    with pytest.raises(ConfigError, match="never loaded"):
        run.check({"config": {}, "seed": 0}, ("config", "seed"))
    assert not marker.exists()


@pytest.mark.slow  # several CLI processes: 20 s or more
def test_evolve_on_a_run_directory_with_a_planted_pickle_runs_nothing(tmp_path, toy_family):
    from runs import evolve_cmd, search_config

    config = search_config(toy_family, tmp_path / "toy.yaml")
    run, marker = _planted(tmp_path)
    before = sorted(p.name for p in run.path.iterdir())
    for extra in ([], ["--resume"]):
        done = subprocess.run(evolve_cmd(config, run.path) + extra, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and "search.pkl" in lines[0] and "Traceback" not in lines[0], lines
    assert not marker.exists()
    assert sorted(p.name for p in run.path.iterdir()) == before


def _finished_run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    _run(run, resume_search(run, _fresh, FEVALS), 3)
    return run


def test_a_history_line_changed_in_the_middle_is_refused(tmp_path):
    run = _finished_run(tmp_path)
    lines = run.history_file.read_text().splitlines(keepends=True)
    lines[4] = lines[4][:20] + "\n"
    run.history_file.write_text("".join(lines))
    with pytest.raises(ConfigError, match=r"history.jsonl line 5 is not a record"):
        RunDir(run.path).records()
    # a record that parses but is not a candidate's
    lines[4] = json.dumps({"generation": "0", "index": 1, "genotype": [0.1] * GENES}) + "\n"
    run.history_file.write_text("".join(lines))
    with pytest.raises(ConfigError, match="line 5 is not a candidate's record"):
        RunDir(run.path).records()


def test_a_last_line_cut_by_a_kill_is_dropped_and_the_rest_kept(tmp_path):
    run = _finished_run(tmp_path)
    count = len(run.records())
    with open(run.history_file, "a") as f:
        f.write('{"generation": 3, "index": 0, "geno')
    assert len(RunDir(run.path).records()) == count
    search = resume_search(RunDir(run.path), _fresh, FEVALS)
    assert search.generation == 3


@pytest.mark.parametrize("change", ["random bytes", "start", "told count", "not finite", "skipped generation",
                                    "genotype"])
def test_a_changed_state_file_is_refused_in_one_line(tmp_path, change):
    run = _finished_run(tmp_path)
    lines = run.search_file.read_text().splitlines()
    if change == "random bytes":
        run.search_file.write_bytes(os.urandom(300) + b"\n")
    elif change == "start":
        start = json.loads(lines[0])
        start["start"]["popsize"] = "six"
        run.search_file.write_text("\n".join([json.dumps(start), *lines[1:]]) + "\n")
    elif change == "told count":
        line = json.loads(lines[2])
        line["told"] = line["told"][:-1]
        run.search_file.write_text("\n".join([*lines[:2], json.dumps(line), *lines[3:]]) + "\n")
    elif change == "not finite":
        run.search_file.write_text("\n".join([*lines[:2], lines[2].replace("[", "[NaN, ", 1)[:], *lines[3:]]) + "\n")
    elif change == "skipped generation":
        run.search_file.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    else:  # the history's candidates are not the ones this state reproduces
        history = run.history_file.read_text().splitlines()
        record = json.loads(history[POPSIZE + 2])
        record["genotype"][0] += 0.01
        history[POPSIZE + 2] = json.dumps(record)
        run.history_file.write_text("\n".join(history) + "\n")
    with pytest.raises(ConfigError) as error:
        resume_search(RunDir(run.path), _fresh, FEVALS)
    message = str(error.value)
    assert "\n" not in message and "search.jsonl" in message and "--storage-path" in message
