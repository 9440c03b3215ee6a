"""The search as users run it: CLI, kill and resume, torchrun with two ranks, failures."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from runs import FEVALS, SEED, evolve_cmd, read_history, search_config, wait_until

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def torchrun_env() -> dict:
    """One thread per rank, as torchrun sets where OMP_NUM_THREADS is not set (conftest sets it
    for the single processes): two ranks share the two cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def outcome(run_dir: Path, *, finished: bool = True) -> dict:
    return {(r["generation"], r["index"]): (tuple(r["genotype"]), r["score"])
            for r in read_history(run_dir, finished=finished)}


def wait_for_records(run_dir: Path, n: int, process, timeout: float) -> None:
    """Until the run has finished n evaluations (the line being written does not count)."""
    done = wait_until(lambda: len(read_history(run_dir, finished=False)) >= n, timeout=timeout, process=process)
    assert done, f"{n} evaluations not finished after {timeout} s (exit code {process.poll()})"


@pytest.fixture(scope="module")
def reference_run(search_run):
    """The uninterrupted single-process run (conftest.search_run) the other runs must reproduce."""
    return search_run.config, search_run.run_dir


def test_run_directory_records_everything(reference_run):
    config, run_dir = reference_run
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["seed"] == SEED and meta["config"] == yaml.safe_load(config.read_text())
    assert {"torch", "transformers", "lm_eval", "cma"} <= set(meta["versions"])
    records = read_history(run_dir)
    assert len(records) == FEVALS and all(r["score"] is not None for r in records)
    assert set(records[0]["results"]) == {"toy_capital_mc_search", "toy_color_mc_search", "toy_sum_mc_search"}
    assert {"apply", "forward", "metrics", "total"} <= set(records[0]["seconds"])
    for r in records:  # every score carries its standard error: tasks' mean_stderr, in quadrature
        tasks = r["results"].values()
        assert r["stderr"] == pytest.approx(math.sqrt(sum(t["acc_stderr,none"] ** 2 for t in tasks)))
        assert all(0 < t["acc_stderr,none"] < 0.5 or t["acc,none"] in (0, 1) for t in tasks)
    best = max(records, key=lambda r: r["score"])
    merge = yaml.safe_load((run_dir / "best_config.yaml").read_text())
    assert merge["merge_method"] == "task_arithmetic"
    # genes in (group, model, filter set, parameter) order: the filter's, then the catch-all's
    weight = merge["slices"][0]["sources"][0]["parameters"]["weight"]
    assert weight[0]["filter"] == "self_attn" and "filter" not in weight[1]
    assert weight[0]["value"] == pytest.approx(abs(best["genotype"][0]))
    assert weight[1]["value"] == pytest.approx(abs(best["genotype"][1]))


def test_killed_run_resumes_without_losing_evaluations(toy_family, reference_run, tmp_path):
    config, reference_dir = reference_run
    run_dir = tmp_path / "run"
    process = subprocess.Popen(evolve_cmd(config, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill in the middle of the second generation, mid-write if it happens to be.
        wait_for_records(run_dir, 9, process, timeout=300)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = outcome(run_dir, finished=False)
    assert 9 <= len(before) < FEVALS, "the run was not killed mid-search"

    resumed = subprocess.run(evolve_cmd(config, run_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    after = outcome(run_dir)
    for key, value in before.items():
        assert after[key] == value  # finished evaluations kept, not recomputed
    assert len(read_history(run_dir)) == len(after)  # nothing evaluated twice
    assert after == outcome(reference_dir)
    assert (run_dir / "best_config.yaml").read_text() == (reference_dir / "best_config.yaml").read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_pid(parent: int, local_rank: int) -> int | None:
    """The pid of torchrun's worker with the given LOCAL_RANK, if it runs."""
    import psutil

    for child in psutil.Process(parent).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank) and "hotmerge" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow
def test_torchrun_restarts_a_crashed_rank_and_resumes(reference_run, tmp_path):
    config, reference_dir = reference_run
    run_dir = tmp_path / "run"
    cmd = [TORCHRUN, "--nproc_per_node=2", "--max-restarts=1", f"--master_port={_free_port()}", "-m", "hotmerge",
           *evolve_cmd(config, run_dir)[3:]]
    log = tmp_path / "torchrun.log"  # a file, not a pipe: nothing blocks while the test waits
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=torchrun_env())
    try:
        wait_for_records(run_dir, 8, process, timeout=600)
        victim = _rank_pid(process.pid, 1)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        process.wait(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, log.read_text()[-3000:]
    after = outcome(run_dir)
    records = read_history(run_dir)
    assert len(records) == len(after)  # nothing evaluated twice
    assert after == outcome(reference_dir)
    # the group was restarted: rank 1 evaluated again after it was killed
    assert any(r["rank"] == 1 and r["finished_at"] > killed_at for r in records)


def test_failed_candidate_is_recorded_and_runtime_stays_usable(toy_family, tmp_path):
    from hotmerge.config.evolve import load_config, validate_config
    from hotmerge.search.worker import CandidateWorker

    config = search_config(toy_family, tmp_path / "toy.yaml")
    worker = CandidateWorker(validate_config(load_config(config)))
    x0 = worker.genome.x0()
    first = worker.evaluate(x0)
    poisoned = x0.copy()
    poisoned[0] = 1e300  # overflows to inf in the merge
    failed = worker.evaluate(poisoned)
    assert failed["score"] is None and "non-finite" in failed["error"]
    assert worker.evaluate(x0)["score"] == first["score"]


@pytest.mark.parametrize("problem, text", [
    ("missing", "does not exist"),
    ("granularity", "layer_granularity=3"),
])
def test_bad_config_gets_one_line_and_exit_2(toy_family, tmp_path, problem, text):
    config = tmp_path / "bad.yaml"
    if problem == "granularity":
        search_config(toy_family, config)
        data = yaml.safe_load(config.read_text())
        data["genome"]["layer_granularity"] = 3
        config.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    done = subprocess.run(evolve_cmd(config, run_dir, 6), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0]
    assert not run_dir.exists()


def test_population_rounds_up_to_a_multiple_of_the_ranks():
    from hotmerge.models.plan import default_popsize
    from hotmerge.run.evolve import population_for

    assert default_popsize(16) == 12
    assert population_for(16, 1, None) is None  # alone: pycma's own default, as mergekit-evolve
    assert population_for(16, 5, None) == 15
    assert population_for(16, 4, None) == 12
    assert population_for(16, 5, 7) == 7  # a forced size is kept


# -- racing and held-out re-scoring, as users run them ----------------------------------------------


@pytest.fixture(scope="module")
def fitness_run(toy_family, tmp_path_factory):
    """A racing run that re-scores the top 2 of every generation on the held-out tasks and
    picks best_config.yaml by the held-out score."""
    from runs import HELDOUT_TASKS

    tmp = tmp_path_factory.mktemp("fitness")
    config = search_config(toy_family, tmp / "toy.yaml")
    data = yaml.safe_load(config.read_text())
    data.update(racing={"schedule": [0.5, 1.0], "delta": 0.2}, heldout_tasks=HELDOUT_TASKS, heldout_top_k=2,
                select_by="heldout")
    config.write_text(yaml.safe_dump(data))
    run_dir = tmp / "run"
    done = subprocess.run(evolve_cmd(config, run_dir), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return config, run_dir, done.stdout


def _latest(run_dir: Path) -> dict:
    latest = {}
    for r in read_history(run_dir):
        latest[(r["generation"], r["index"])] = r
    return latest


@pytest.mark.slow  # the fitness_run fixture: an evolve run
def test_racing_run_rescores_the_top_and_picks_by_heldout(fitness_run):
    from hotmerge.search.coordinator import XFAVORITE_INDEX

    config, run_dir, stdout = fitness_run
    records = _latest(run_dir)
    search = [r for (g, i), r in records.items() if i != XFAVORITE_INDEX]
    assert len(search) == FEVALS
    assert all("stopped_early" in r and r["items"] > 0 and r["stderr"] is not None for r in search)
    assert (run_dir / "race.jsonl").is_file()
    for generation in {r["generation"] for r in search}:
        mine = [r for r in search if r["generation"] == generation]
        full = sorted((r for r in mine if not r["stopped_early"]), key=lambda r: (-r["score"], r["index"]))
        assert {r["index"] for r in mine if "heldout_score" in r} == {r["index"] for r in full[:2]}
    mean = [r for (g, i), r in records.items() if i == XFAVORITE_INDEX]
    assert len(mean) == 1 and mean[0]["heldout_score"] is not None
    rescored = [r for r in records.values() if r.get("heldout_score") is not None]
    best = max(rescored, key=lambda r: r["heldout_score"])
    weight = yaml.safe_load((run_dir / "best_config.yaml").read_text())["slices"][0]["sources"][0]
    assert weight["parameters"]["weight"][0]["value"] == pytest.approx(abs(best["genotype"][0]))
    assert f"gap {best['score'] - best['heldout_score']:+.4f}" in stdout


@pytest.mark.slow
def test_torchrun_racing_run_equals_the_single_process_run(fitness_run, tmp_path):
    """Two ranks share every kind of job (racing rounds, held-out scores) and end where the
    single process ends: scores do not depend on which rank scored a candidate. (Plain
    evaluation under torchrun: test_torchrun_restarts_a_crashed_rank_and_resumes.)"""
    config, reference_dir, _ = fitness_run
    run_dir = tmp_path / "run"
    cmd = [TORCHRUN, "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "hotmerge",
           *evolve_cmd(config, run_dir)[3:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=torchrun_env())
    assert done.returncode == 0, done.stderr[-3000:]

    def fields(run):
        return {key: (r["genotype"], r["score"], r.get("stopped_early"), r.get("items"), r.get("heldout_score"))
                for key, r in _latest(run).items()}

    assert fields(run_dir) == fields(reference_dir)
    assert {r["rank"] for r in _latest(run_dir).values()} == {0, 1}


TOY_TASKS = Path(__file__).resolve().parents[1] / "hotmerge" / "toy" / "tasks"


@pytest.mark.slow
def test_a_bug_stop_is_not_restarted_into_the_same_bug(toy_family, tmp_path):
    """Under torchrun --max-restarts, a run that stopped on bugs in a row exits with an error,
    and torchrun restarts the group: the restarted ranks see the stop and exit at once,
    evaluating nothing. Running the command anew forgets the stop."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "boom.py").write_text("def results(doc, results):\n    raise ZeroDivisionError('injected bug')\n")
    (tasks / "toy_boom.yaml").write_text(f"include: {TOY_TASKS / 'toy_capital_mc_search.yaml'}\n"
                                         "task: toy_boom\nprocess_results: !function boom.results\n")
    config = search_config(toy_family, tmp_path / "toy.yaml")
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "tasks": ["toy_boom"]}))
    run_dir = tmp_path / "run"
    cmd = [TORCHRUN, "--nproc_per_node=2", "--max-restarts=1", f"--master_port={_free_port()}", "-m", "hotmerge",
           *evolve_cmd(config, run_dir, FEVALS, "--task-search-path", str(tasks))[3:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=torchrun_env())
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    stop_file = run_dir / "stopped.json"
    assert "bugs in a row" in json.loads(stop_file.read_text())["message"]
    assert output.count("this torchrun restart exits at once") >= 2, output[-3000:]  # both ranks of the restart
    bugs = [r for r in read_history(run_dir) if r.get("failure") == "bug"]
    assert bugs and all(r["finished_at"] <= stop_file.stat().st_mtime for r in bugs)  # none after the stop
    assert "Traceback" not in done.stdout

    # the same command run anew (the bug "fixed") forgets the stop and resumes
    (tasks / "boom.py").write_text("def results(doc, results):\n"
                                   "    scores = [loglikelihood for loglikelihood, _ in results]\n"
                                   "    return {'acc': float(scores.index(max(scores)) == int(doc['label']))}\n")
    again = subprocess.run(evolve_cmd(config, run_dir, FEVALS, "--task-search-path", str(tasks)),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not stop_file.exists()
    records = {(r["generation"], r["index"]): r for r in read_history(run_dir)}
    assert len([k for k in records if k[1] >= 0]) == FEVALS
    assert all(r.get("failure") is None for r in records.values())
