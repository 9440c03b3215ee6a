"""Typed errors: bad input is one line and exit 2 with nothing left behind; a bug in a
candidate is recorded with its traceback, stops the run after a few in a row, and the
run resumes and finishes once the bug is gone."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from hotmerge.errors import (
    BUG,
    CANDIDATE,
    BugsInARow,
    CandidateError,
    ConfigError,
    HotmergeError,
    RunFailed,
    SetupError,
)

HOTMERGE = [sys.executable, "-m", "hotmerge"]
EVOLVE_OPTIONS = ["--force-population-size", "6", "--random-seed", "3", "--quiet", "--no-save-final-model"]


def toy_config(family, path: Path, tasks=("toy_capital_mc_search", "toy_sum_mc_search")) -> Path:
    config = {
        "genome": {
            "models": [str(p) for p in family.experts],
            "base_model": str(family.base),
            "merge_method": "task_arithmetic",
            "layer_granularity": 2,
            "normalize": False,
        },
        "tasks": list(tasks),
        "apply_chat_template": False,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def tree(root: Path) -> dict[str, int]:
    """Every file under root with its size: what a command may not change."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def run_cli(args: list[str], *, cwd: Path, env: dict | None = None, timeout: int = 300,
            command: list[str] = HOTMERGE) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_error_line(done: subprocess.CompletedProcess, code: int = 2) -> str:
    assert done.returncode == code, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


# -- the exit-code table ---------------------------------------------------------------------------


def test_every_error_class_has_its_exit_code():
    from hotmerge.cli import exit_code

    assert exit_code(ConfigError("x")) == 2
    assert exit_code(SetupError("x")) == 1
    assert exit_code(CandidateError("x")) == 1
    assert exit_code(RunFailed("x")) == 1
    assert exit_code(BugsInARow("x")) == 1
    assert exit_code(HotmergeError("x")) == 1
    assert exit_code(ValueError("x")) is None  # a bug: Python's traceback
    assert str(SetupError("two\nlines")) == "two lines"


def test_hotmerge_debug_shows_the_traceback(tmp_path):
    # the two runs side by side: each spends its time importing
    loud = subprocess.Popen([*HOTMERGE, "plan", "missing.yaml"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HOTMERGE_DEBUG": "1"})
    quiet = run_cli(["plan", "missing.yaml"], cwd=tmp_path)
    _, loud_stderr = loud.communicate(timeout=300)
    assert "missing.yaml" in one_error_line(quiet)
    assert loud.returncode == 2
    assert "Traceback (most recent call last)" in loud_stderr and "ConfigError" in loud_stderr
    assert loud_stderr.strip().splitlines()[-1] == quiet.stderr.strip()


# -- point 7: bad input found by a new user --------------------------------------------------------


def test_truncated_model_file_is_refused_by_plan(toy_family, tmp_path):
    family = tmp_path / "family"
    shutil.copytree(toy_family.root, family)
    weights = family / "expert_sum" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    config = toy_config(toy_family, tmp_path / "toy.yaml")
    config.write_text(config.read_text().replace(str(toy_family.root), str(family)))
    before = tree(tmp_path)
    line = one_error_line(run_cli(["plan", str(config)], cwd=tmp_path))
    assert "expert_sum" in line and "cut short" in line
    assert tree(tmp_path) == before


@pytest.mark.slow  # several CLI processes: 20 s or more
def test_storage_path_that_is_a_file(toy_family, tmp_path):
    """--storage-path a file, or a folder below one: both runs side by side, each in a folder of
    its own (each spends its time importing)."""
    runs = {}
    for where in ("file", "below a file"):
        folder = tmp_path / where.replace(" ", "_")
        folder.mkdir()
        config = toy_config(toy_family, folder / "toy.yaml")
        blocker = folder / "notes.txt"
        blocker.write_text("my notes\n")
        storage = blocker if where == "file" else blocker / "run"
        before = tree(folder)
        process = subprocess.Popen([*HOTMERGE, "evolve", str(config), "--storage-path", str(storage), "--max-fevals",
                                    "6", *EVOLVE_OPTIONS], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        runs[where] = folder, blocker, before, process
    for where, (folder, blocker, before, process) in runs.items():
        out, err = process.communicate(timeout=300)
        done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        assert "--storage-path" in one_error_line(done), where
        assert tree(folder) == before and blocker.read_text() == "my notes\n", where


@pytest.mark.slow  # an unknown task name needs lm-eval's full task index (15-20 s)
def test_run_refused_while_its_tasks_resolve_leaves_nothing(toy_family, tmp_path):
    config = toy_config(toy_family, tmp_path / "toy.yaml", tasks=("toy_capital_mc_search", "no_such_task"))
    run_dir = tmp_path / "run"
    done = run_cli(["evolve", str(config), "--storage-path", str(run_dir), "--max-fevals", "6", *EVOLVE_OPTIONS],
                   cwd=tmp_path)
    assert "no_such_task" in one_error_line(done)
    assert not run_dir.exists()  # so the next call cannot "resume" it
    assert "resuming" not in done.stdout


# Siblings of the classes above, in-process: every one is refused before any work.


def _invoke(args: list[str]):
    from typer.testing import CliRunner

    from hotmerge.cli import app

    return CliRunner().invoke(app, args)


def _refused(args: list[str], *words: str) -> str:
    result = _invoke(args)
    assert isinstance(result.exception, ConfigError), (result.exception, result.output)
    message = str(result.exception)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_export_refuses_targets_it_would_destroy(toy_family, tmp_path):
    config = str(toy_config(toy_family, tmp_path / "toy.yaml"))
    (tmp_path / "a_file").write_text("x")
    _refused(["export", config, str(tmp_path / "a_file"), "--x0"], "OUT_DIR", "is a file")
    _refused(["export", config, str(tmp_path / "a_file" / "below"), "--x0"], "OUT_DIR", "cannot be created")
    _refused(["export", config, str(toy_family.base), "--x0"], "OUT_DIR", "a model of the merge")
    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    _refused(["export", config, str(home), "--x0"], "OUT_DIR", "holds other files")
    assert (home / "documents").is_dir() and (tmp_path / "a_file").read_text() == "x"
    assert not list(tmp_path.glob("*.partial"))


def test_eval_report_and_toy_refuse_bad_paths_before_work(toy_family, tmp_path):
    config = str(toy_config(toy_family, tmp_path / "toy.yaml"))
    (tmp_path / "a_file").write_text("x")
    _refused(["eval", config, "--x0", "--output", str(tmp_path)], "--output", "is a folder")
    _refused(["eval", config, "--x0", "--output", str(tmp_path / "a_file" / "out.json")], "--output")
    _refused(["eval", config, "--x0", "--task-search-path", str(tmp_path / "nowhere")], "--task-search-path")
    _refused(["evolve", config, "--storage-path", str(tmp_path / "run"),
              "--task-search-path", str(tmp_path / "nowhere")], "--task-search-path")
    _refused(["eval", config, "--x0", "--tasks", ","], "--tasks", "names no task")
    _refused(["toy", "build", str(tmp_path / "a_file")], "OUT_DIR", "is a file")
    assert not (tmp_path / "run").exists()


def test_report_refuses_an_out_that_is_a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    _refused(["report", str(tmp_path), "--out", str(tmp_path / "a_file")], "--out", "is a file")


def test_resume_of_a_run_whose_run_json_is_broken(toy_family, tmp_path):
    config = str(toy_config(toy_family, tmp_path / "toy.yaml"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{not json")
    _refused(["evolve", config, "--storage-path", str(run_dir)], "run.json")


def test_device_that_is_not_there():
    from hotmerge.runtimes.hf import pick_device

    assert pick_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="not a device"):
        pick_device("gpu0")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda:0")


# -- safetensors files that do not hold what their header says -------------------------------------


def _model_folder(root: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  "num_hidden_layers": 1}))
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(4, 8, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(8, dtype=torch.bfloat16)}, root / "model.safetensors")
    return root


def _rewrite_header(file: Path, change) -> None:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


@pytest.mark.parametrize("damage, words", [
    ("truncated", "cut short"),
    ("header longer than file", "cut short"),
    ("tiny", "too short"),
    ("wrong byte count", "needs 32 bytes but its header gives it 64"),
    ("no offsets", "data_offsets"),
    ("no shape", "shape"),
    ("not an object", "not a JSON object"),
])
def test_damaged_safetensors_is_a_config_error(tmp_path, damage, words):
    from hotmerge.models.folder import ModelInfo

    folder = _model_folder(tmp_path / "model")
    file = folder / "model.safetensors"
    name = "model.layers.0.mlp.up_proj.weight"
    if damage == "truncated":
        os.truncate(file, file.stat().st_size - 1)
    elif damage == "header longer than file":
        file.write_bytes(struct.pack("<Q", 10_000) + file.read_bytes()[8:])
    elif damage == "tiny":
        file.write_bytes(b"\x01\x02")
    elif damage == "wrong byte count":
        _rewrite_header(file, lambda h: h[name].update(shape=[4, 4]))
    elif damage == "no offsets":
        _rewrite_header(file, lambda h: h[name].pop("data_offsets"))
    elif damage == "no shape":
        _rewrite_header(file, lambda h: h[name].update(shape="4x8"))
    elif damage == "not an object":
        _rewrite_header(file, lambda h: h.update({name: [1, 2]}))
    with pytest.raises(ConfigError) as error:
        ModelInfo.from_path(folder)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_sharded_index_that_does_not_match_its_files(tmp_path):
    from hotmerge.models.folder import ModelInfo

    folder = _model_folder(tmp_path / "model")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model.safetensors",
                                                "lm_head.weight": "model.safetensors"}}))
    with pytest.raises(ConfigError, match="lm_head.weight"):
        ModelInfo.from_path(folder)
    index.write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(ConfigError, match="weight_map"):
        ModelInfo.from_path(folder)
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model.safetensors",
                                                "model.layers.0.mlp.up_proj.weight": "model.safetensors"}}))
    assert set(ModelInfo.from_path(folder).tensors) == {"model.norm.weight", "model.layers.0.mlp.up_proj.weight"}


# -- candidate errors and bugs in the worker -------------------------------------------------------


class _Genome:
    size = 2

    def param_values(self, x):
        return {"weight": np.asarray(x)}

    def decode(self, x):
        return x


class _Runtime:
    lm = None

    def __init__(self, error=None):
        self.error = error

    def apply(self, recipe):
        if self.error is not None:
            raise self.error


class _Suite:
    doc_counts = {"t": 1}

    def __init__(self, score=1.0, error=None):
        self.score, self.error = score, error

    def evaluate(self, lm):
        from hotmerge.scoring.suite import TaskScores

        if self.error is not None:
            raise self.error
        return TaskScores(score=self.score, results={"t": {"acc,none": self.score}})


def _worker(runtime=None, suite=None):
    from hotmerge.errors import candidate_error_types
    from hotmerge.search.worker import CandidateWorker

    worker = CandidateWorker.__new__(CandidateWorker)
    worker.genome, worker.runtime, worker.suite = _Genome(), runtime or _Runtime(), suite or _Suite()
    worker.candidate_errors = candidate_error_types()
    worker.applied = None
    return worker


def test_candidate_errors_score_worst_and_bugs_carry_their_traceback():
    from hotmerge.kernels import NonFiniteMergeError

    x = np.array([0.5, 0.5])
    assert _worker().evaluate(x)["score"] == 1.0
    for worker in (_worker(runtime=_Runtime(NonFiniteMergeError([3], ["w"]))),
                   _worker(suite=_Suite(error=CandidateError("task t metric acc,none is nan"))),
                   _worker(suite=_Suite(score=float("nan")))):
        result = worker.evaluate(x)
        assert result["score"] is None and result["failure"] == CANDIDATE and "traceback" not in result
    buggy = _worker(runtime=_Runtime(KeyError("model.layers.9")))
    result = buggy.evaluate(x)
    assert result["score"] is None and result["failure"] == BUG
    assert "KeyError" in result["error"] and "Traceback (most recent call last)" in result["traceback"]
    with pytest.raises(KeyError):
        buggy.evaluate(x, raise_bugs=True)


# -- bugs in a row stop the run; a resume after the fix finishes it --------------------------------


def _good(x) -> dict:
    return {"score": -float(np.sum((np.asarray(x) - 0.3) ** 2)), "results": {}, "error": None,
            "params": None, "seconds": {}}


def _bug(x) -> dict:
    return {"score": None, "results": None, "failure": BUG, "error": "ZeroDivisionError: injected",
            "traceback": "Traceback (most recent call last):\nZeroDivisionError: injected\n",
            "params": None, "seconds": {}}


def _coordinator(run_dir: Path, evaluate, world_size=1, cls=None):
    from hotmerge.search.coordinator import Coordinator
    from hotmerge.search.strategy import Search
    from hotmerge.run.evolve import resume_search
    from hotmerge.run.storage import RunDir

    run = RunDir(run_dir)
    run.path.mkdir(exist_ok=True)
    search = resume_search(run, lambda: Search(np.full(3, 0.5), 0.2, 1, 24, 6), 24)
    worker = SimpleNamespace(evaluate=evaluate)
    return (cls or Coordinator)(run, search, worker, 24, lambda record: None, world_size=world_size,
                                genotype_size=3, log=lambda *_: None)


def _outcome(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return {(r["generation"], r["index"]): (tuple(r["genotype"]), r["score"]) for r in records}


def test_bugs_in_a_row_on_rank_0_stop_and_the_resume_finishes(tmp_path):
    from hotmerge.search.coordinator import MAX_BUGS_IN_A_ROW

    reference = _coordinator(tmp_path / "reference", _good)
    reference.run_loop()

    calls = []

    def buggy_after_eight(x):
        calls.append(x)
        return _good(x) if len(calls) <= 8 else _bug(x)

    broken = _coordinator(tmp_path / "run", buggy_after_eight)
    broken.run_loop()
    assert broken.bug_stop is not None and broken.bug_stop.rank == 0
    assert len(calls) == 8 + MAX_BUGS_IN_A_ROW  # stopped at once
    assert broken.search.generation == 1  # generation 1 met the bugs and was not told
    tracebacks = sorted((tmp_path / "run" / "errors").iterdir())
    assert len(tracebacks) == MAX_BUGS_IN_A_ROW and "ZeroDivisionError" in tracebacks[-1].read_text()
    assert broken.bug_stop.traceback_file == tracebacks[-1]

    fixed = _coordinator(tmp_path / "run", _good)
    fixed.run_loop()
    assert fixed.bug_stop is None and fixed.progress.evaluations == 24
    assert _outcome(tmp_path / "run") == _outcome(tmp_path / "reference")


def test_bugs_in_a_row_on_another_rank_stop_the_run(tmp_path):
    import time

    from hotmerge.search.coordinator import MAX_BUGS_IN_A_ROW, Coordinator

    class TwoRanks(Coordinator):
        def _remote(self, rank, job):  # rank 1, without a process group
            return _bug(job.x)

    def slow_good(x):
        time.sleep(0.02)  # leave rank 1 its share of the generation
        return _good(x)

    coordinator = _coordinator(tmp_path / "run", slow_good, world_size=2, cls=TwoRanks)
    coordinator._stop_workers = lambda: None
    coordinator.run_loop()
    assert coordinator.bug_stop is not None and coordinator.bug_stop.rank == 1
    assert coordinator.search.generation == 0
    assert len(list((tmp_path / "run" / "errors").glob("*-r1.txt"))) == MAX_BUGS_IN_A_ROW


def test_candidate_errors_and_lone_bugs_do_not_stop_the_run(tmp_path):
    def candidate_error(x):
        return {"score": None, "results": None, "failure": CANDIDATE, "error": "NonFiniteMergeError: inf",
                "params": None, "seconds": {}}

    # candidate errors: five in a row, then every other one; bugs: never two in a row
    for name, failure, first in [("candidate errors", candidate_error, 5), ("lone bugs", _bug, 1)]:
        calls = []

        def every_other(x):
            calls.append(x)
            return failure(x) if len(calls) % 2 or len(calls) <= first else _good(x)

        coordinator = _coordinator(tmp_path / name, every_other)
        coordinator.run_loop()
        assert coordinator.bug_stop is None and coordinator.progress.evaluations == 24, name


# A bug injected into the merge path of the real CLI: the run stops after a few
# candidates with the traceback in the run directory, and the same command without the
# bug resumes the run and finishes it.
INJECT = """
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")  # as hotmerge.cli.main does before its imports
import hotmerge.runtimes.merger as merger

def broken(self, recipe):
    raise ZeroDivisionError("injected bug")

merger.Merger.apply = broken
from hotmerge.cli import main
sys.argv = ["hotmerge", *sys.argv[1:]]
main()
"""


@pytest.mark.slow  # two evolve runs
def test_injected_bug_stops_the_cli_run_and_the_fixed_run_resumes(toy_family, tmp_path):
    from hotmerge.search.coordinator import MAX_BUGS_IN_A_ROW

    config = toy_config(toy_family, tmp_path / "toy.yaml")

    def evolve(run_dir: Path, command=HOTMERGE):
        return run_cli(["evolve", str(config), "--storage-path", str(run_dir), "--max-fevals", "12",
                        *EVOLVE_OPTIONS], cwd=tmp_path, command=command)

    broken = evolve(tmp_path / "run", command=[sys.executable, "-c", INJECT])
    line = one_error_line(broken, code=1)
    assert f"{MAX_BUGS_IN_A_ROW} bugs in a row" in line and "ZeroDivisionError: injected bug" in line
    tracebacks = sorted((tmp_path / "run" / "errors").iterdir())
    assert len(tracebacks) == MAX_BUGS_IN_A_ROW and str(tracebacks[-1]) in line
    text = tracebacks[-1].read_text()
    assert "Traceback (most recent call last)" in text and "merger.apply" in text
    history = [json.loads(s) for s in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [r["failure"] for r in history] == [BUG] * MAX_BUGS_IN_A_ROW
    assert history[-1]["traceback_file"] == str(tracebacks[-1].relative_to(tmp_path / "run"))

    resumed = evolve(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.startswith("best score ")  # --quiet: the result alone
    # The candidates that met the bug were evaluated again, and the run went to its budget
    # (that a resumed run ends as an untroubled one is checked exactly with the coordinator above).
    outcome = _outcome(tmp_path / "run")
    assert sorted(outcome) == [(g, i) for g in range(2) for i in range(6)]
    assert all(score is not None for _, score in outcome.values())
    assert (tmp_path / "run" / "best_config.yaml").is_file()


# -- the vLLM runtime: no silent fallback at start-up ----------------------------------------------


class _FakeLLM:
    """Stands in for vllm.LLM: the engine start and the worker's setup answer as told."""

    started: list = []
    fail_start: Exception | None = None
    layouts: list = []

    def __init__(self, **kwargs):
        if _FakeLLM.fail_start is not None:
            raise _FakeLLM.fail_start
        self.shut_down = False
        self.llm_engine = type("Engine", (), {})()
        self.llm_engine.engine_core = type("Core", (), {"shutdown": lambda _: setattr(self, "shut_down", True)})()
        _FakeLLM.started.append(self)

    def collective_rpc(self, method, args=()):
        assert method == "hotmerge_setup"
        return _FakeLLM.layouts


def _layout(unmapped=()):
    return {"placements": [], "unmapped": list(unmapped), "resident_bytes": 0, "packed_modules": 0,
            "repack": False, "device": "cpu", "timings": {}}


def test_vllm_start_up_has_no_silent_fallback(toy_family, tmp_path, monkeypatch):
    """An engine that does not start, a worker that cannot map the model and a source tensor
    that the model's loader ignores (it would stay unmerged in every candidate) are each a
    SetupError naming --no-vllm, and an engine that did start is shut down."""
    pytest.importorskip("vllm")
    import vllm

    from hotmerge.config.evolve import load_config, validate_config
    from hotmerge.runtimes.vllm import VLLMRuntime

    validated = validate_config(load_config(toy_config(toy_family, tmp_path / "toy.yaml")))
    monkeypatch.setattr(vllm, "LLM", _FakeLLM)
    monkeypatch.setattr(_FakeLLM, "started", [])

    monkeypatch.setattr(_FakeLLM, "fail_start", ValueError("Unsupported CPU attention configuration"))
    with pytest.raises(SetupError, match="did not start.*Unsupported CPU attention.*--no-vllm"):
        VLLMRuntime(validated, prove_writes=False)
    monkeypatch.setattr(_FakeLLM, "fail_start", None)

    extra = "model.layers.0.self_attn.gate_bias"
    monkeypatch.setattr(_FakeLLM, "layouts", [_layout([extra])])
    with pytest.raises(SetupError, match=f"ignores 1 source tensor.*{extra}.*unmerged.*--no-vllm"):
        VLLMRuntime(validated, prove_writes=False)
    assert _FakeLLM.started[-1].shut_down

    monkeypatch.setattr(_FakeLLM, "layouts", [_layout(), {"setup_error": "cannot map x: use --no-vllm"}])
    with pytest.raises(SetupError, match="cannot map x"):
        VLLMRuntime(validated, prove_writes=False)
    assert _FakeLLM.started[-1].shut_down


def test_vllm_cpu_patch_is_in_place_or_start_up_refuses(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    from hotmerge.runtimes import vllm_worker

    assert vllm_worker.PATCH_PROBLEM is None
    if current_platform.is_cpu():
        import vllm.model_executor.layers.utils as layer_utils

        assert layer_utils.dispatch_cpu_unquantized_gemm.hotmerge_keeps_weight
    extension = vllm_worker.HotmergeWorkerExtension()
    monkeypatch.setattr(vllm_worker, "PATCH_PROBLEM", "dispatch_cpu_unquantized_gemm is not there")
    answer = extension.hotmerge_setup({})
    assert "dispatch_cpu_unquantized_gemm" in answer["setup_error"] and "--no-vllm" in answer["setup_error"]
    monkeypatch.setattr(vllm_worker, "PATCH_PROBLEM", None)

    def unmappable(spec):
        raise vllm_worker.MappingError("source tensor x lands in live parameter y as a scattered set")

    monkeypatch.setattr(extension, "hotmerge_setup_layout", unmappable)
    assert "scattered" in extension.hotmerge_setup({})["setup_error"]


def test_vllm_live_parameter_that_no_source_fills_is_refused(monkeypatch):
    """Discovery on a model whose loader maps q and k into a fused parameter but sends v
    nowhere: v_proj would keep its initial values in every candidate."""
    pytest.importorskip("vllm")
    import torch

    from hotmerge.runtimes import vllm_worker

    class Model(torch.nn.Module):
        def __init__(self, maps_v: bool):
            super().__init__()
            self.qk_proj = torch.nn.Parameter(torch.zeros(4, 3))
            self.v_proj = torch.nn.Parameter(torch.zeros(2, 3))
            self.maps_v = maps_v

        def load_weights(self, weights):
            for name, tensor in weights:
                if name in ("q", "k"):
                    self.qk_proj.data[(0 if name == "q" else 2):][:2] = tensor
                elif name == "v" and self.maps_v:
                    self.v_proj.data[:] = tensor

    def discover(model):
        extension = vllm_worker.HotmergeWorkerExtension()
        monkeypatch.setattr(vllm_worker.vllm_compat, "worker_model", lambda worker: model)
        state = vllm_worker._State(names=["k", "q", "v"], shapes={n: (2, 3) for n in "kqv"},
                                   params=dict(model.named_parameters()))
        extension.hotmerge_discover(state, tp=1)
        return state

    assert {(p.name, p.param) for p in discover(Model(maps_v=True)).placements} == {
        ("q", "qk_proj"), ("k", "qk_proj"), ("v", "v_proj")}
    with pytest.raises(vllm_worker.MappingError, match="live parameter v_proj of vLLM's model takes no source "
                                                      "tensor.*--no-vllm"):
        discover(Model(maps_v=False))


def test_history_line_cut_by_a_kill_is_dropped_before_the_next_append(tmp_path):
    """A resumed run appends after the last complete record, never onto a fragment."""
    from hotmerge.run.storage import RunDir

    def record(index):
        return {"generation": 0, "index": index, "genotype": [0.1, 0.2], "score": 0.5 + index / 10}

    run = RunDir(tmp_path)
    run.append_history(record(0))
    run.append_history(record(1))
    with open(run.history_file, "a") as f:
        f.write('{"generation": 0, "index": 2, "sco')  # the kill
    resumed = RunDir(tmp_path)
    assert [r["index"] for r in resumed.read_history()] == [0, 1]
    resumed.append_history(record(2))
    resumed.append_history(record(3))
    assert [r["index"] for r in RunDir(tmp_path).read_history()] == [0, 1, 2, 3]
