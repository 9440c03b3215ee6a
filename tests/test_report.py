"""`hotmerge report` and the result sinks (CSV, W&B offline, TensorBoard) on one small real run."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from runs import FEVALS, HELDOUT_TASKS, SEARCH_TASKS, read_history
from typer.testing import CliRunner

from hotmerge.cli import app
from hotmerge.run.sinks import CsvSink, Sink, Sinks

PNG = b"\x89PNG\r\n\x1a\n"


def history(run_dir: Path) -> list[dict]:
    return read_history(run_dir)


@pytest.fixture(scope="module")
def toy_run(search_run):
    """The shared search (conftest.search_run): every sink on, W&B offline (no network), CSV,
    TensorBoard; a filter set (S = 2), so the genome heatmap has one panel per parameter and filter."""
    return search_run.run_dir, search_run.wandb_dir


def report(*args: str):
    result = CliRunner().invoke(app, ["report", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_png(path: Path, min_bytes: int = 8000) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG, path
    assert len(data) > min_bytes, (path, len(data))
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


# -- the report ---------------------------------------------------------------------------

def test_report_writes_every_plot(toy_run, tmp_path):
    from hotmerge.run.report import build_report

    run_dir, _ = toy_run
    out = tmp_path / "report"
    report(run_dir, "--out", out)
    for name in ("progress", "best_tasks", "best_genome", "pareto"):
        width, height = assert_png(out / f"{name}.png")
        assert width > 300 and height > 300

    # The heatmap: one (G, M) panel per parameter and filter set, from the best record's params.
    result = build_report(run_dir, tmp_path / "again", log=lambda *_: None)
    G, M, S, P = json.loads((run_dir / "run.json").read_text())["genome_shape"]
    assert (G, M, S, P) == (2, 3, 2, 1)
    assert len(result.heatmaps) == P * S
    best = max(history(run_dir), key=lambda r: r["score"])
    weights = np.asarray(best["params"]["weight"])
    for s, (title, matrix) in enumerate(result.heatmaps.items()):
        assert matrix.shape == (G, M)
        assert np.array_equal(matrix, weights[:, :, s]), title
    assert result.best["score"] == best["score"]


def test_summary_has_best_recipe_metrics_and_timings(toy_run, tmp_path):
    run_dir, _ = toy_run
    report(run_dir, "--out", tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    records = history(run_dir)
    best = max(records, key=lambda r: r["score"])
    assert f"best score {best['score']:.4f}** ± {best['stderr']:.4f} (standard error)" in summary
    for task in SEARCH_TASKS:
        assert f"| {task} | acc,none | 1 | {best['results'][task]['acc,none']:.4f} |" in summary
    assert (run_dir / "best_config.yaml").read_text().strip() in summary
    for phase in ("apply", "forward", "metrics", "total"):
        values = [r["seconds"][phase] for r in records]
        assert f"| {phase} | {len(records)} | {sum(values):.2f} | {np.median(values):.4f} |" in summary
    assert "evaluations per minute" in summary
    assert f"evaluations: {len(records)} of {FEVALS}" in summary
    assert "## Non-dominated candidates" in summary  # three tasks: the table


def test_report_on_a_run_being_written(toy_run, tmp_path):
    """A cut last line (a run still writing, or killed) and failed candidates."""
    run_dir, _ = toy_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    records = history(copy)
    for i in (2, 7):
        records[i].update(score=None, results=None, error=f"RuntimeError: merge blew up #{i}")
    lines = [json.dumps(r) for r in records]
    cut = lines[-1][: len(lines[-1]) // 2]
    (copy / "history.jsonl").write_text("\n".join(lines[:-1]) + "\n" + cut)
    out = tmp_path / "out"
    report(copy, "--out", out)
    summary = (out / "summary.md").read_text()
    n = len(records) - 1
    assert f"evaluations: {n} of {FEVALS}" in summary
    assert "ends with an unfinished line" in summary
    assert f"2 of {n} evaluations failed" in summary and "merge blew up #7" in summary
    assert_png(out / "progress.png")
    best = max((r for r in records[:-1] if r["score"] is not None), key=lambda r: r["score"])
    assert f"best score {best['score']:.4f}" in summary


def test_pareto_with_two_tasks_and_non_dominated():
    from hotmerge.run.report import non_dominated

    points = np.array([[1, 0], [0, 1], [0.5, 0.5], [0.4, 0.4], [1, 0], [0.5, 0.6]])
    assert non_dominated(points).tolist() == [True, True, False, False, True, True]


def test_pareto_plot_with_two_tasks(toy_run, tmp_path):
    run_dir, _ = toy_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    meta = json.loads((copy / "run.json").read_text())
    meta["config"]["tasks"] = SEARCH_TASKS[:2]
    (copy / "run.json").write_text(json.dumps(meta))
    report(copy, "--out", tmp_path / "out")
    assert_png(tmp_path / "out" / "pareto.png")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "over the per-task metrics of 2 tasks" in summary.lower()


def test_heldout_scores_the_best_recipe(toy_run, tmp_path):
    run_dir, _ = toy_run
    report(run_dir, "--out", tmp_path, "--heldout", ",".join(HELDOUT_TASKS))
    held = json.loads((tmp_path / "heldout.json").read_text())
    assert set(held["best"]["results"]) == set(HELDOUT_TASKS)
    summary = (tmp_path / "summary.md").read_text()
    for task in HELDOUT_TASKS:
        assert f"| {task} | acc,none | {held['best']['results'][task]['acc,none']:.4f} |" in summary
    assert_png(tmp_path / "best_tasks.png")


def test_report_refuses_a_folder_without_a_run(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code != 0 and "holds no run" in str(result.exception)


# -- the sinks ----------------------------------------------------------------------------

def test_csv_rows_equal_history_lines(toy_run):
    run_dir, _ = toy_run
    records = history(run_dir)
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) == FEVALS
    for row, record in zip(rows, records):
        assert (int(row["generation"]), int(row["index"]), int(row["rank"])) == (
            record["generation"], record["index"], record["rank"])
        assert float(row["score"]) == record["score"]
        assert json.loads(row["genotype"]) == record["genotype"]
        for task in SEARCH_TASKS:
            assert float(row[f"{task}/acc,none"]) == record["results"][task]["acc,none"]
        for phase, value in record["seconds"].items():
            assert float(row[f"seconds/{phase}"]) == value


def test_csv_sink_rebuilds_from_history_and_widens(tmp_path):
    records = [{"generation": 0, "index": i, "rank": 0, "genotype": [i], "score": None if i == 1 else i / 2,
                "results": None if i == 1 else {"t": {"acc,none": i / 4}}, "error": "boom" if i == 1 else None,
                "seconds": {"total": 1.0 + i}} for i in range(3)]
    path = tmp_path / "h.csv"
    path.write_text("generation,index\n0,0\n")  # a stale, partial CSV from a killed run
    sink = CsvSink(path, records[:2], ["t/acc,none"])
    sink.log(records[2])
    sink.log({**records[2], "index": 3, "results": {"t": {"acc,none": 0.5, "new,none": 0.25}}})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3]
    assert rows[1]["error"] == "boom" and rows[1]["score"] == ""
    assert rows[3]["t/new,none"] == "0.25" and rows[0]["t/new,none"] == ""


def test_sinks_record_heldout_scores(tmp_path):
    """A held-out re-scoring fills the candidate's CSV row and is charted at the step of the
    latest evaluation."""
    from hotmerge.run.sinks import _ScalarSink

    class Charted(_ScalarSink):
        def __init__(self):
            super().__init__()
            self.points = []

        def _write_evaluation(self, step, record, scalars):
            self.points.append((step, scalars))

        def _write_generation(self, generation, stats):
            pass

    records = [{"generation": 0, "index": i, "rank": 0, "genotype": [i], "score": i / 2,
                "results": {"t": {"acc,none": i / 2}}, "error": None} for i in range(2)]
    path = tmp_path / "h.csv"
    csv_sink, charted = CsvSink(path, records[:1]), Charted()
    sinks = Sinks([csv_sink, charted])
    sinks.log(records[1])
    rescored = {**records[0], "heldout_score": 0.25, "heldout_stderr": 0.05,
                "heldout_results": {"h": {"acc,none": 0.25}}}
    sinks.log_heldout(rescored)
    assert sinks.active == [csv_sink, charted]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["index"], r["heldout_score"], r["heldout_stderr"]) for r in rows] == [("0", "0.25", "0.05"),
                                                                                   ("1", "", "")]
    assert charted.points[-1] == (1, {"heldout_score": 0.25, "heldout_stderr": 0.05, "heldout/h/acc,none": 0.25})


def test_a_failing_sink_is_reported_once_and_switched_off():
    class Broken(Sink):
        name = "broken"
        calls = 0

        def log(self, record, progress=None):
            Broken.calls += 1
            raise OSError("disk full")

    class Keeper(Sink):
        name = "keeper"

        def __init__(self):
            self.seen = []

        def log(self, record, progress=None):
            self.seen.append(record)

    messages = []
    keeper = Keeper()
    sinks = Sinks([Broken(), keeper], log=messages.append)
    for i in range(3):
        sinks.log({"generation": 0, "index": i, "score": 1.0})
    sinks.close()
    assert Broken.calls == 1 and len(keeper.seen) == 3
    assert len(messages) == 1 and "broken" in messages[0] and "disk full" in messages[0]


def wandb_records(path: Path):
    """The records of a .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        buf += chunk
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_run_holds_the_logged_data(toy_run):
    pytest.importorskip("wandb")
    run_dir, wandb_dir = toy_run
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    folders = list(wandb_dir.glob(f"wandb/offline-run-*-{run_id}"))
    assert len(folders) == 1, list(wandb_dir.rglob("*"))
    rows, summary, run_record = [], {}, None
    for record in wandb_records(folders[0] / f"run-{run_id}.wandb"):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
        elif kind == "run":
            run_record = record.run
    assert run_record is not None and run_record.project == "hotmerge-tests"
    records = history(run_dir)
    evaluations = [r for r in rows if "score" in r]
    assert len(evaluations) == len(records)
    best = None
    for row, record in zip(evaluations, records):
        best = record["score"] if best is None else max(best, record["score"])
        assert row["score"] == record["score"] and row["best_score"] == best
        assert row["generation"] == record["generation"]
        for task in SEARCH_TASKS:
            assert row[f"metrics/{task}/acc,none"] == record["results"][task]["acc,none"]
        assert row["seconds/total"] == record["seconds"]["total"]
    populations = [r for r in rows if "population/mean" in r]
    generations = sorted({r["generation"] for r in records})
    assert [p["generation"] for p in populations] == generations
    for p in populations:
        scores = [r["score"] for r in records if r["generation"] == p["generation"]]
        assert p["population/size"] == len(scores)
        assert p["population/max"] == max(scores)
        assert p["population/mean"] == pytest.approx(np.mean(scores))
    assert summary["best_score"] == max(r["score"] for r in records)


def test_tensorboard_events_hold_the_scores(toy_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = toy_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    records = history(run_dir)
    scores = events.Scalars("score")
    assert [s.step for s in scores] == list(range(1, len(records) + 1))
    assert [s.value for s in scores] == pytest.approx([r["score"] for r in records], rel=1e-6)
    assert len(events.Scalars("population/mean")) == len({r["generation"] for r in records})


def test_summary_shows_the_search_versus_heldout_gap(tmp_path):
    """A re-scored candidate's last history line is its record; with select_by: heldout the
    best is the best held-out score among fully scored candidates, and the summary has the
    gap table, CMA-ES's mean included."""
    from hotmerge.run.report import load_run, write_summary

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"genome": {"models": ["a", "b"], "merge_method": "linear"}, "tasks": ["t"],
              "heldout_tasks": ["h"], "select_by": "heldout", "racing": True}
    (run_dir / "run.json").write_text(json.dumps({"config": config, "max_fevals": 3, "seed": 0}))

    def record(index, score, **extra):
        return {"generation": 0, "index": index, "rank": 0, "genotype": [index], "score": score, "stderr": 0.1,
                "results": {"t": {"acc,none": score}}, "error": None, **extra}

    lines = [record(0, 0.9), record(1, 0.95, stopped_early=True, race="inside", items=10), record(2, 0.7),
             record(0, 0.9, heldout_score=0.6, heldout_stderr=0.05),
             record(2, 0.7, heldout_score=0.65, heldout_stderr=0.05),
             {**record(-1, 0.8, heldout_score=0.62, heldout_stderr=0.05), "generation": 1, "xfavorite": True}]
    (run_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = load_run(run_dir)
    assert len(data.records) == 4 and data.best["index"] == 2  # held-out 0.65 beats 0.6; the mean 0.62
    write_summary(data, tmp_path / "summary.md", {}, None, None)
    summary = (tmp_path / "summary.md").read_text()
    assert "- evaluations: 3 of 3 (budget reached)" in summary
    assert "Held-out score 0.6500 ± 0.0500: a gap of +0.0500" in summary
    assert "| 0 | 0 | 0.9000 ± 0.1000 | 0.6000 ± 0.0500 | +0.3000 |" in summary
    assert "| 1 | CMA-ES mean | 0.8000 ± 0.1000 | 0.6200 ± 0.0500 | +0.1800 |" in summary
    assert f"Mean gap (search - held-out): {np.mean([0.3, 0.05, 0.18]):+.4f}" in summary


def test_budget_plot_counts_the_search_documents_when_each_heldout_score_was_measured(tmp_path):
    """budget.png: each held-out score against the documents the search had scored when it was
    measured; CMA-ES's means scored in full count, held-out scoring does not."""
    from hotmerge.run.report import budget_points, build_report, load_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"genome": {"models": ["a", "b"], "merge_method": "linear"}, "tasks": ["t"], "heldout_tasks": ["h"],
              "subsets": True}
    (run_dir / "run.json").write_text(json.dumps({"config": config, "max_fevals": 4, "seed": 0}))

    def record(generation, index, items, **extra):
        return {"generation": generation, "index": index, "rank": 0, "genotype": [index], "score": 0.5 + index / 10,
                "stderr": 0.1, "results": None, "error": None, "fitness": "subset", "items": items, **extra}

    def mean(generation, **extra):
        return record(generation, -1, 500, fitness="full", xfavorite=True, **extra)

    lines = [record(0, 0, 40), record(0, 1, 20), record(1, 0, 30), record(1, 1, 30), mean(1),
             mean(1, heldout_score=0.55, heldout_stderr=0.05), record(2, 0, 50), record(2, 1, 50),
             mean(3, heldout_score=0.58)]
    (run_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    points, unit = budget_points(load_run(run_dir).lines)
    assert unit == "documents scored"
    # the mean of generation 1 counted once, though its held-out score rewrote its line
    assert [(p["generation"], p["index"], p["spent"]) for p in points] == [(1, -1, 620), (3, -1, 1220)]
    report = build_report(run_dir, tmp_path / "report")
    assert report.files["budget"].stat().st_size > 0
