"""What the commands print: `eval` every metric with its standard error, `evolve --quiet` the
result alone, a progress counter that says why it passes its limit, and no lm-eval progress
bars anywhere (hotmerge draws its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from rich.console import Console

from hotmerge.config.evolve import TaskConfig
from hotmerge.errors import ConfigError

HOTMERGE = [sys.executable, "-m", "hotmerge"]
# The marks of a tqdm bar, and the names of lm-eval's own bars.
BAR_MARKS = ("it/s]", "s/it]", "%|", "Running loglikelihood requests", "Tokenizing inputs")


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """hotmerge ARGS as a user runs it: no TQDM_DISABLE (the Makefile exports it, a shell may not)."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    return subprocess.run([*HOTMERGE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_no_bars(text: str) -> None:
    found = [mark for mark in BAR_MARKS if mark in text]
    assert not found, f"progress bars ({found}) in:\n{text[-3000:]}"


def genome_config(family, path: Path, tasks: list) -> Path:
    path.write_text(yaml.safe_dump({
        "genome": {"models": [str(p) for p in family.experts], "base_model": str(family.base),
                   "merge_method": "task_arithmetic", "layer_granularity": 2, "normalize": False},
        "tasks": tasks,
        "apply_chat_template": False,
    }))
    return path


# -- lm-eval's progress bars ---------------------------------------------------------------------


def test_quiet_progress_bars_overrides_what_callers_ask_for():
    from hotmerge.scoring.lm_eval_compat import PROGRESS_METHODS, quiet_progress_bars

    asked = []

    class LM:  # HFLM's shape: loglikelihood_rolling asks its inner call for bars
        def loglikelihood(self, requests, disable_tqdm=False):
            asked.append(("loglikelihood", disable_tqdm))
            return self._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            asked.append(("loglikelihood_rolling", disable_tqdm))
            return self._loglikelihood_tokens(requests=requests, disable_tqdm=False, override_bs=1)

        def generate_until(self, requests, disable_tqdm=False):
            asked.append(("generate_until", disable_tqdm))
            return requests

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            asked.append(("_loglikelihood_tokens", disable_tqdm))
            return requests

    lm = LM()
    quiet_progress_bars(lm)
    quiet_progress_bars(lm)  # wraps once
    assert lm.loglikelihood(["a"]) == ["a"]
    lm.loglikelihood_rolling(["b"], disable_tqdm=True)
    lm.generate_until(["c"])
    assert [name for name, _ in asked] == ["loglikelihood", "_loglikelihood_tokens", "loglikelihood_rolling",
                                           "_loglikelihood_tokens", "generate_until"]
    assert all(disabled is True for _, disabled in asked)
    assert set(PROGRESS_METHODS) == {name for name, _ in asked}


# -- eval: every metric, the configured one picks the score --------------------------------------


def test_a_task_without_the_configured_metric_is_scored_by_its_first_metric_when_reported():
    from hotmerge.scoring.suite import ReportedTask, TaskSuite

    suite = TaskSuite([ReportedTask("toy_capital_gen_heldout"), ReportedTask("toy_capital_mc_heldout")])
    assert [spec.metric for spec in suite.specs] == ["exact_match,none", "acc,none"]
    assert suite.notes == ["task toy_capital_gen_heldout has no metric acc,none: its score is exact_match,none, "
                           "its first metric"]
    # A search objective stays explicit: a missing metric is still a config error there.
    with pytest.raises(ConfigError, match="has no metric 'acc,none': use one of exact_match,none"):
        TaskSuite([TaskConfig(name="toy_capital_gen_heldout")])


def test_the_metrics_table_pairs_each_metric_with_its_stderr():
    from hotmerge.cli import _metrics_table

    results = {"toy_a": {"acc,none": 0.5, "acc_stderr,none": 0.125, "acc_norm,none": 0.75,
                         "acc_norm_stderr,none": 0.0625},
               "toy_b": {"word_perplexity,none": 3.25, "bits_per_byte,none": 1.5}}
    console = Console(file=StringIO(), width=120)
    console.print(_metrics_table("score 1.0", results))
    rows = [line.replace("│", " ").split() for line in console.file.getvalue().splitlines()]
    rows = [row for row in rows if row and row[0].startswith("toy_")]
    assert rows == [["toy_a", "acc,none", "0.5000", "0.1250"],
                    ["toy_a", "acc_norm,none", "0.7500", "0.0625"],
                    ["toy_b", "word_perplexity,none", "3.2500", "N/A"],
                    ["toy_b", "bits_per_byte,none", "1.5000", "N/A"]]


@pytest.mark.slow
def test_eval_prints_every_metric_of_tasks_without_the_configured_one(toy_family, tmp_path):
    config = genome_config(toy_family, tmp_path / "toy.yaml", ["toy_capital_mc_search"])
    output = tmp_path / "metrics.json"
    tasks = ["toy_capital_gen_heldout", "toy_color_mc_heldout", "toy_sum_ppl_search"]
    done = run_cli(["eval", str(config), "--x0", "--tasks", ",".join(tasks), "--output", str(output)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_no_bars(done.stdout + done.stderr)  # loglikelihood, generate_until and loglikelihood_rolling
    notes = [line for line in done.stdout.splitlines() if line.startswith("note: ")]
    assert notes[0].startswith("note: sources device: "), notes  # where the sources live, and why
    assert notes[1:] == [
        "note: task toy_capital_gen_heldout has no metric acc,none: its score is exact_match,none, its first metric",
        "note: task toy_sum_ppl_search has no metric acc,none: its score is word_perplexity,none, its first metric"]
    record = json.loads(output.read_text())
    results = record["results"]  # lm-eval's results layout
    gen, mc, ppl = (results[task] for task in tasks)
    assert set(gen) == {"exact_match,none", "exact_match_stderr,none"}
    assert set(mc) == {"acc,none", "acc_stderr,none"}
    assert set(ppl) == {"word_perplexity,none", "bits_per_byte,none"}  # lm-eval bootstraps their errors
    assert record["score"] == pytest.approx(gen["exact_match,none"] + mc["acc,none"] + ppl["word_perplexity,none"])
    # one table row per metric: task, metric, value, stderr
    cells = [line.replace("│", " ").split() for line in done.stdout.splitlines()]
    rows = {tuple(row[:2]): row[2:] for row in cells if row and row[0] in tasks}
    expected = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filter_key = key.partition(",")
            if not metric.endswith("_stderr"):
                stderr = metrics.get(f"{metric}_stderr,{filter_key}")
                expected[(task, key)] = [f"{value:.4f}", "N/A" if stderr is None else f"{stderr:.4f}"]
    assert rows == expected and len(rows) == 4


# -- evolve: the progress counter and --quiet ----------------------------------------------------


def progress(evaluations: int, max_fevals: int = 2):
    return SimpleNamespace(evaluations=evaluations, max_fevals=max_fevals, generation=1, best_score=0.5,
                           best_stderr=0.1, last_score=0.5, failures=0, per_minute=60.0, eta_seconds=0.0)


def record(index: int, **extra) -> dict:
    return {"generation": 1, "index": index, "score": 0.5, "stderr": 0.1, **extra}


def test_the_counter_says_why_it_passes_the_limit():
    from hotmerge.run.progress import ProgressView

    console = Console(file=StringIO(), width=80)  # no terminal: plain lines
    view = ProgressView(console)
    view.update(progress(1), record(0))
    view.update(progress(8), record(7))
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 2  # one line per candidate, however narrow the console
    assert "evals 1/2  " in lines[0] and "finished whole" not in lines[0]
    assert "evals 8/2 (a generation is finished whole)  " in lines[1]
    table = Console(file=StringIO(), width=80)
    table.print(view._table(progress(8)))
    assert "8/2 (a generation is finished whole)" in table.file.getvalue()


def test_quiet_progress_prints_failures_only():
    from hotmerge.run.progress import ProgressView

    console = Console(file=StringIO(), width=80)
    view = ProgressView(console, quiet=True)
    view.update(progress(1), record(0))
    view.heldout(record(0, heldout_score=0.5, heldout_stderr=0.1))
    assert console.file.getvalue() == ""
    view.update(progress(2), record(1, score=None, error="CandidateError: non-finite logits"))
    view.heldout(record(0, heldout_score=None, heldout_error="CandidateError: out of memory"))
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("gen 1 cand 1: ") and lines[0].endswith("FAILED: CandidateError: non-finite logits")
    assert lines[1] == "held-out: gen 1 cand 0 FAILED: CandidateError: out of memory"


@pytest.fixture(scope="module")
def quiet_run(toy_family, tmp_path_factory):
    """One generation of `evolve --quiet` past a budget of 2, on tasks of every request type
    but generation (a loglikelihood_rolling task among them: HFLM draws bars inside it)."""
    tmp = tmp_path_factory.mktemp("quiet")
    tasks = ["toy_capital_mc_search", {"name": "toy_sum_ppl_search", "metric": "word_perplexity,none",
                                       "weight": -0.01}]
    config = genome_config(toy_family, tmp / "toy.yaml", tasks)
    run_dir = tmp / "run"
    args = ["evolve", str(config), "--storage-path", str(run_dir), "--max-fevals", "2",
            "--force-population-size", "4", "--random-seed", "3", "--quiet", "--no-save-final-model"]
    return SimpleNamespace(dir=run_dir, done=run_cli(args, cwd=tmp), tmp=tmp)


@pytest.mark.slow
def test_evolve_quiet_prints_the_result_alone(quiet_run):
    done = quiet_run.done
    assert done.returncode == 0, done.stderr[-3000:]
    assert_no_bars(done.stdout + done.stderr)
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith("best score ") and lines[0].endswith(str(quiet_run.dir / "best_config.yaml"))
    assert done.stderr == ""


@pytest.mark.slow
def test_toy_compare_draws_no_lm_eval_bars(quiet_run):
    assert quiet_run.done.returncode == 0, quiet_run.done.stderr[-3000:]
    done = run_cli(["toy", "compare", str(quiet_run.dir)], cwd=quiet_run.tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_no_bars(done.stdout + done.stderr)
    assert "best recipe" in done.stdout and "expert_capital" in done.stdout
