"""Where a search's results go besides history.jsonl: CSV, Weights & Biases, TensorBoard.

A sink sees every finished evaluation on rank 0 (`log(record, progress)`), every
held-out re-scoring of one (`log_heldout(record)`: the same record with heldout_score,
heldout_stderr and heldout_results added), and is closed once at the end (`close()`).
Sinks never stop the search: `Sinks` calls each one inside a guard, reports the first
error of a sink once and switches that sink off.

  CSV           RUN_DIR/history.csv, one row per candidate, its latest history line
                (rebuilt from history.jsonl when a run resumes, so the rows always
                equal the history's records)
  W&B           --wandb/--wandb-project/--wandb-entity as in mergekit-evolve; WANDB_MODE
                (offline, disabled) and WANDB_DIR are honoured; the run id is kept in
                RUN_DIR/wandb_run_id so a resumed search continues the same W&B run
  TensorBoard   RUN_DIR/tensorboard/ event files, when the `tensorboard` package imports
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import statistics
import string
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from hotmerge.errors import ConfigError
from hotmerge.run.storage import best_record

CSV_NAME = "history.csv"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
FIXED_COLUMNS = ("generation", "index", "rank", "fitness", "score", "stderr", "told", "stopped_early",
                 "items", "error", "heldout_score", "heldout_stderr")
SECONDS = ("apply", "forward", "metrics", "total")


# -- what every sink reads from a record ------------------------------------------------

def metric_values(record: dict) -> dict[str, float]:
    """"task/metric" -> value for every numeric metric of a record (none when it failed)."""
    out = {}
    for task, metrics in (record.get("results") or {}).items():
        for metric, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{task}/{metric}"] = float(value)
    return out


def seconds_values(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in (record.get("seconds") or {}).items() if isinstance(v, (int, float))}


def population_stats(records: list[dict]) -> dict[str, float]:
    """Score statistics of one generation: size, failures, mean, std, min, max."""
    scores = [r["score"] for r in records if r.get("score") is not None]
    stats: dict[str, float] = {"size": len(records), "failures": len(records) - len(scores)}
    if scores:
        stats.update(mean=statistics.fmean(scores), std=statistics.pstdev(scores),
                     min=min(scores), max=max(scores))
    return stats


class _Generations:
    """Collects records per generation; hands back a generation once the next one starts."""

    def __init__(self):
        self.generation: Optional[int] = None
        self.records: list[dict] = []

    def add(self, record: dict) -> Optional[tuple[int, list[dict]]]:
        done = None
        generation = record.get("generation")
        if self.generation is not None and generation != self.generation and self.records:
            done = (self.generation, self.records)
            self.records = []
        self.generation = generation
        self.records.append(record)
        return done

    def flush(self) -> Optional[tuple[int, list[dict]]]:
        if self.generation is None or not self.records:
            return None
        done = (self.generation, self.records)
        self.records = []
        return done


class _Best:
    def __init__(self):
        self.record: Optional[dict] = None

    def add(self, record: dict) -> Optional[float]:
        """The best search score so far (a raced candidate stopped early is an estimate)."""
        if best_record([self.record, record] if self.record else [record]) is record:
            self.record = record
        return None if self.record is None else self.record["score"]


# -- the interface and the guard ---------------------------------------------------------

class Sink:
    """One destination for results. Subclasses implement log() and, if needed, close()."""

    name = "sink"

    def log(self, record: dict, progress: Any = None) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def log_heldout(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Sinks:
    """Every sink of a run behind one guard: a failing sink is reported once and dropped."""

    def __init__(self, sinks: Iterable[Sink] = (), log: Callable[[str], None] = print):
        self.active: list[Sink] = list(sinks)
        self.disabled: dict[str, str] = {}
        self._log = log

    def _disable(self, sink: Sink, what: str, error: BaseException) -> None:
        if sink in self.active:
            self.active.remove(sink)
        message = f"{type(error).__name__}: {error}"
        self.disabled[sink.name] = message
        try:
            self._log(f"warning: the {sink.name} logger failed while {what} ({message}); "
                      f"it is switched off, the search goes on (history.jsonl has every result)")
        except Exception:
            pass
        try:
            sink.close()
        except Exception:
            pass

    def _each(self, what: str, call: Callable[[Sink], None]) -> None:
        for sink in list(self.active):
            try:
                call(sink)
            except Exception as error:  # a logger must never stop the search
                self._disable(sink, what, error)

    def log(self, record: dict, progress: Any = None) -> None:
        self._each("logging a result", lambda sink: sink.log(record, progress))

    def log_heldout(self, record: dict) -> None:
        self._each("logging a held-out score", lambda sink: sink.log_heldout(record))

    def close(self) -> None:
        for sink in list(self.active):
            try:
                sink.close()
            except Exception as error:
                self._disable(sink, "closing", error)
        self.active = []

    def __bool__(self) -> bool:
        return bool(self.active)


# -- CSV -----------------------------------------------------------------------------------

def csv_row(record: dict) -> dict[str, Any]:
    row: dict[str, Any] = {k: record.get(k) for k in FIXED_COLUMNS}
    for key, value in seconds_values(record).items():
        row[f"seconds/{key}"] = value
    row.update(metric_values(record))
    row["genotype"] = json.dumps(record.get("genotype"))
    return row


class CsvSink(Sink):
    """RUN_DIR/history.csv: generation, index, rank, score, error, held-out score, seconds/*,
    task/metric..., genotype; one row per candidate (its latest history line).

    Opening it rewrites the file from the history so far (a run killed between the
    history line and the CSV row resumes with a complete CSV); a record that brings a
    column the header lacks rewrites the file once with the wider header.
    """

    name = "CSV"

    def __init__(self, path: Path, history: Iterable[dict] = (), metric_columns: Iterable[str] = ()):
        self.path = Path(path)
        self.rows = [csv_row(r) for r in history]
        self.columns = self._columns(list(metric_columns))
        self._rewrite()

    def _columns(self, first: list[str]) -> list[str]:
        columns = [*FIXED_COLUMNS, *(f"seconds/{k}" for k in SECONDS), *first]
        for row in self.rows:
            columns.extend(k for k in row if k not in columns and k != "genotype")
        columns = [c for c in columns if c != "genotype"]
        return [*dict.fromkeys(columns), "genotype"]

    def _rewrite(self) -> None:
        from hotmerge.run.storage import atomic_write

        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, text.getvalue().encode())

    def log(self, record: dict, progress: Any = None) -> None:
        row = csv_row(record)
        self.rows.append(row)
        if any(k not in self.columns for k in row):
            self.columns = self._columns([])
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore", lineterminator="\n").writerow(row)

    def log_heldout(self, record: dict) -> None:
        """The candidate's row gains its held-out score (the file is rewritten)."""
        key = (record.get("generation"), record.get("index"))
        for i, row in enumerate(self.rows):
            if (row["generation"], row["index"]) == key:
                self.rows[i] = csv_row(record)
                self._rewrite()
                return


# -- Weights & Biases ------------------------------------------------------------------------

def require_wandb() -> None:
    """Fail before any work when --wandb is asked for and wandb is not installed."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("--wandb needs the wandb package: pip install 'hotmerge[logging]' "
                          "(or drop --wandb; history.jsonl has every result)") from None


class _ScalarSink(Sink):
    """What the W&B and TensorBoard sinks share: per evaluation the scalars score,
    best_score, failed, metrics/<task>/<metric> and seconds/<phase> at step `evaluation`;
    per held-out re-scoring heldout_score, heldout_stderr and heldout/<task>/<metric> at
    the step of the latest evaluation; per generation population/{size,failures,mean,
    std,min,max} at step `generation`."""

    def __init__(self):
        self.best = _Best()
        self.generations = _Generations()
        self.evaluations = 0

    def log(self, record: dict, progress: Any = None) -> None:
        done = self.generations.add(record)
        if done is not None:
            self._write_generation(done[0], population_stats(done[1]))
        self.evaluations = getattr(progress, "evaluations", None) or self.evaluations + 1
        best = self.best.add(record)
        scalars: dict[str, Any] = {}
        if record.get("score") is not None:
            scalars["score"] = record["score"]
        if best is not None:
            scalars["best_score"] = best
        scalars["failed"] = int(record.get("score") is None)
        scalars.update({f"metrics/{k}": v for k, v in metric_values(record).items()})
        scalars.update({f"seconds/{k}": v for k, v in seconds_values(record).items()})
        self._write_evaluation(self.evaluations, record, scalars)

    def log_heldout(self, record: dict) -> None:
        if record.get("heldout_score") is None:
            return
        scalars = {"heldout_score": record["heldout_score"]}
        if record.get("heldout_stderr") is not None:
            scalars["heldout_stderr"] = record["heldout_stderr"]
        scalars.update({f"heldout/{k}": v for k, v in metric_values(
            {"results": record.get("heldout_results")}).items()})
        self._write_evaluation(self.evaluations, record, scalars)

    def close(self) -> None:
        done = self.generations.flush()
        if done is not None:
            self._write_generation(done[0], population_stats(done[1]))
        self._finish()

    def _write_evaluation(self, step: int, record: dict, scalars: dict[str, Any]) -> None:
        raise NotImplementedError  # pragma: no cover - interface

    def _write_generation(self, generation: int, stats: dict[str, float]) -> None:
        raise NotImplementedError  # pragma: no cover - interface

    def _finish(self) -> None:
        pass


class WandbSink(_ScalarSink):
    """The scalars of _ScalarSink in a W&B run; the best record in the run's summary."""

    name = "Weights & Biases"

    def __init__(self, run_dir: Path, meta: dict, project: Optional[str] = None,
                 entity: Optional[str] = None):
        import wandb

        super().__init__()
        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_file.write_text(run_id + "\n")
        kwargs: dict[str, Any] = dict(project=project, entity=entity, config=meta, id=run_id,
                                      resume="allow", name=run_dir.resolve().name, job_type="hotmerge-evolve")
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(run_dir)
        self.run = wandb.init(**kwargs)
        self.run.define_metric("evaluation")
        self.run.define_metric("generation")
        for key in ("score", "best_score", "failed", "metrics/*", "seconds/*", "heldout_score", "heldout_stderr",
                    "heldout/*"):
            self.run.define_metric(key, step_metric="evaluation")
        self.run.define_metric("population/*", step_metric="generation")
        self.run.define_metric("score", summary="max")

    def _write_evaluation(self, step: int, record: dict, scalars: dict[str, Any]) -> None:
        self.run.log({"evaluation": step, "generation": record.get("generation"), **scalars})

    def _write_generation(self, generation: int, stats: dict[str, float]) -> None:
        self.run.log({"generation": generation, **{f"population/{k}": v for k, v in stats.items()}})

    def _finish(self) -> None:
        if self.best.record is not None:
            best = self.best.record
            self.run.summary["best_score"] = best["score"]
            self.run.summary["best_generation"] = best["generation"]
            self.run.summary["best_index"] = best["index"]
            self.run.summary["best_genotype"] = best["genotype"]
        self.run.finish()


# -- TensorBoard ------------------------------------------------------------------------------

def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception:
        return False
    return True


class TensorBoardSink(_ScalarSink):
    """RUN_DIR/tensorboard: the scalars of _ScalarSink as event files."""

    name = "TensorBoard"

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__()
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def _write_evaluation(self, step: int, record: dict, scalars: dict[str, Any]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def _write_generation(self, generation: int, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            if not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(f"population/{key}", value, generation)

    def _finish(self) -> None:
        self.writer.close()


# -- what evolve() opens -------------------------------------------------------------------------

def open_sinks(run, options, log: Callable[[str], None] = print) -> Sinks:
    """The sinks EvolveOptions asks for, for the run directory `run` (a RunDir), on rank 0.

    A sink that cannot start is reported and left out; the search runs regardless.
    """
    sinks = Sinks(log=log)
    history = run.records()

    def start(name: str, make: Callable[[], Sink]) -> None:
        try:
            sinks.active.append(make())
        except Exception as error:
            sinks.disabled[name] = f"{type(error).__name__}: {error}"
            log(f"warning: the {name} logger could not start ({type(error).__name__}: {error}); "
                "the search goes on without it (history.jsonl has every result)")

    meta = json.loads(run.meta_file.read_text()) if run.meta_file.is_file() else {}
    tasks = (meta.get("config") or {}).get("tasks") or []
    metric_columns = []
    for task in tasks:
        name, metric = (task, "acc,none") if isinstance(task, str) else (task.get("name"), task.get("metric", "acc,none"))
        metric_columns.append(f"{name}/{metric}")

    if getattr(options, "csv", True):
        start(CsvSink.name, lambda: CsvSink(run.path / CSV_NAME, history, metric_columns))
    tensorboard = getattr(options, "tensorboard", None)
    if tensorboard or (tensorboard is None and tensorboard_available()):
        start(TensorBoardSink.name, lambda: TensorBoardSink(run.path / TENSORBOARD_DIR))
    if getattr(options, "wandb", False):
        start(WandbSink.name, lambda: WandbSink(run.path, meta, getattr(options, "wandb_project", None),
                                                getattr(options, "wandb_entity", None)))
    return sinks
