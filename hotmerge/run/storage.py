"""The run directory: everything a run needs to be inspected or resumed.

  run.json          versions, config, seed and options (written once, checked on resume)
  history.jsonl     one line per finished evaluation, flushed and fsynced
  search.jsonl      how CMA-ES started, then per told generation the values it was told
                    (search/strategy.py replays them: the state is data, never a pickle)
  best_config.yaml  mergekit merge config of the best candidate so far (atomic)
  irt.jsonl         with IRT anchors: every calibrated candidate's per-item values
  irt.json          with IRT anchors: the fitted item model and its anchors (atomic)
  stopped.json      why the run stopped on bugs, so that a group torchrun restarts does not
                    run into them again (removed when the command is run anew)
  errors/           one file per candidate that met a bug: its traceback

Nothing is written before the run has passed every check (`check`), so a run
refused at start-up leaves no folder behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from hotmerge.errors import ConfigError
from hotmerge.search.scores import choice_score


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_folder_target(path: Path, what: str) -> None:
    """Refuse, before any work, a folder that hotmerge is to create or write into but cannot.

    `what` names the argument in the message (e.g. "--storage-path")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder: pick a folder (it is created if missing)")
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {existing} is a file, not a folder: "
                          "pick another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable: pick a folder you can write to")


def check_file_target(path: Path, what: str) -> None:
    """Refuse, before any work, a file path that hotmerge is to write but cannot."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder: give the path of a file to write")
    check_folder_target(path.absolute().parent, f"{what} {path}: its folder")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta_file = self.path / "run.json"
        self.history_file = self.path / "history.jsonl"
        self.search_file = self.path / "search.jsonl"
        self.legacy_search_file = self.path / "search.pkl"
        self.best_file = self.path / "best_config.yaml"
        self.race_file = self.path / "race.jsonl"
        self.stop_file = self.path / "stopped.json"
        self.irt_rows_file = self.path / "irt.jsonl"
        self.irt_model_file = self.path / "irt.json"
        self._tails_checked = set()  # files whose unfinished last line (a kill's) is cut before appending

    def exists(self) -> bool:
        return self.meta_file.is_file()

    @property
    def errors_dir(self) -> Path:
        return self.path / "errors"

    def check_path(self) -> None:
        """Refuse a storage path that cannot hold a run, before anything is written."""
        check_folder_target(self.path, "--storage-path")
        if self.meta_file.exists() and not self.meta_file.is_file():
            raise ConfigError(f"{self.meta_file} is not a file: pick another --storage-path")
        if self.legacy_search_file.exists():
            raise ConfigError(
                f"{self.legacy_search_file} is an older hotmerge's pickled state, which is never loaded "
                "(unpickling can run code): to resume, delete it and hotmerge rebuilds the search from "
                f"{self.history_file.name}; or pick a new --storage-path")

    def read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.meta_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {self.meta_file} ({e}): is {self.path} a hotmerge run "
                              "directory? Pick a new --storage-path") from e
        if not isinstance(meta, dict):
            raise ConfigError(f"{self.meta_file} is not a hotmerge run.json: pick a new --storage-path")
        return meta

    def check(self, meta: dict[str, Any], resume_keys: tuple[str, ...]) -> bool:
        """Whether `meta` may start or resume a run here, writing nothing. True when resuming."""
        self.check_path()
        if not self.exists():
            return False
        old = self.read_meta()
        for key in resume_keys:
            if old.get(key) != meta.get(key):
                raise ConfigError(
                    f"{self.path} holds a run with a different {key}: resume it with the same "
                    "config and options, or pick a new --storage-path"
                )
        return True

    def start(self, meta: dict[str, Any], resume_keys: tuple[str, ...]) -> bool:
        """Create the run, or check that an existing one is the same run. True when resuming."""
        if self.check(meta, resume_keys):
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.meta_file, json.dumps(meta, indent=2, default=str).encode())
        return False

    def save_traceback(self, name: str, text: str) -> Path:
        """Keep a bug's traceback as errors/NAME; returns its path."""
        path = self.errors_dir / name
        atomic_write(path, text.encode())
        return path

    def append_history(self, record: dict[str, Any]) -> None:
        self._append(self.history_file, record)

    def append_race(self, record: dict[str, Any]) -> None:
        """Keep one round of a raced candidate (its per-item values), for an exact resume."""
        self._append(self.race_file, record)

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=_jsonable) + "\n"
        if path not in self._tails_checked:
            _trim_unfinished_line(path)
            self._tails_checked.add(path)
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_history(self) -> list[dict[str, Any]]:
        """Every history line, in order. A candidate re-scored on the held-out tasks has a
        second, fuller line; `records` keeps the last line of each candidate."""
        lines = _read_jsonl(self.history_file)
        for number, record in enumerate(lines, start=1):
            if not _history_record(record):
                raise ConfigError(f"{self.history_file} line {number} is not a candidate's record (the file "
                                  "was changed): restore it, or pick a new --storage-path")
        return lines

    def records(self) -> list[dict[str, Any]]:
        """One record per candidate (generation, index): its last line."""
        return latest_records(self.read_history())

    def read_race(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.race_file)

    def clear_race(self) -> None:
        """Forget the rounds of a generation CMA-ES has been told: only the generation in
        progress is ever replayed, so the file stays the size of one generation."""
        if self.race_file.is_file():
            atomic_write(self.race_file, b"")

    def save_search_start(self, start: dict[str, Any]) -> None:
        """Begin the state file with how the search started (Search.start)."""
        atomic_write(self.search_file, (json.dumps({"start": start}) + "\n").encode())

    def append_told(self, generation: int, told: list[float], seconds: float, subsets: dict | None = None) -> None:
        """Keep what CMA-ES was told for one generation, after it was told (and, with subsets,
        the size the next generation's subset has: search/subsets.py)."""
        line = {"generation": generation, "told": list(told), "seconds": seconds}
        if subsets is not None:
            line["subsets"] = subsets
        self._append(self.search_file, line)

    def read_search(self) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """(start, told generations) from the state file, every value checked; None when absent."""
        lines = _read_jsonl(self.search_file)
        if not lines:
            return None
        where = self.search_file
        start = lines[0].get("start")
        if not (isinstance(start, dict) and _numbers(start.get("x0")) and start["x0"]
                and _number(start.get("sigma0")) and start["sigma0"] > 0 and _integer(start.get("seed"))
                and _integer(start.get("popsize")) and start["popsize"] >= 2):
            raise ConfigError(f"{where} line 1 is not the start of a hotmerge search: restore the file or "
                              "pick a new --storage-path")
        for number, line in enumerate(lines[1:], start=2):
            subsets = line.get("subsets")
            if not (_integer(line.get("generation")) and _numbers(line.get("told"))
                    and _number(line.get("seconds")) and line["seconds"] >= 0
                    and (subsets is None or (isinstance(subsets, dict) and set(subsets) == {"items", "noise"}
                                             and _numbers(list(subsets.values())) and subsets["items"] > 0))):
                raise ConfigError(f"{where} line {number} is not a told generation: restore the file or pick "
                                  "a new --storage-path")
        return start, lines[1:]

    def append_irt_row(self, row: dict[str, Any]) -> None:
        """Keep one calibrated candidate's per-item values (search/irt.py)."""
        self._append(self.irt_rows_file, row)

    def read_irt_rows(self) -> list[dict[str, Any]]:
        rows = _read_jsonl(self.irt_rows_file)
        for number, row in enumerate(rows, start=1):
            if not (_integer(row.get("generation")) and _integer(row.get("index")) and _numbers(row.get("values"))):
                raise ConfigError(f"{self.irt_rows_file} line {number} is not a calibrated candidate's values: "
                                  "restore it, or pick a new --storage-path")
        return rows

    def save_irt_model(self, model) -> None:
        atomic_write(self.irt_model_file, model.to_json().encode())

    def read_irt_model(self, pool: int):
        """The item model the run fitted last (search/irt.ItemModel), or None."""
        from hotmerge.search.irt import ItemModel

        if not self.irt_model_file.is_file():
            return None
        try:
            return ItemModel.from_json(self.irt_model_file.read_text(), pool)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{self.irt_model_file} is not what hotmerge wrote ({e}): restore it, or pick a new "
                              "--storage-path") from None

    def save_stop(self, message: str) -> None:
        """Keep why the run stopped on bugs (read by a restarted torchrun group)."""
        atomic_write(self.stop_file, json.dumps({"message": message}).encode())

    def read_stop(self) -> str | None:
        if not self.stop_file.is_file():
            return None
        try:
            message = json.loads(self.stop_file.read_bytes()).get("message")
        except (ValueError, AttributeError, UnicodeDecodeError):
            message = None
        if not isinstance(message, str):
            raise ConfigError(f"{self.stop_file} is not what hotmerge wrote: delete it, or pick a new --storage-path")
        return message

    def clear_stop(self) -> None:
        self.stop_file.unlink(missing_ok=True)

    def save_best(self, merge_config: dict[str, Any]) -> None:
        atomic_write(self.best_file, yaml.safe_dump(merge_config, sort_keys=False).encode())


def best_record(records, select_by: str = "search") -> dict | None:
    """The record best_config.yaml is written from: the first with the highest search score
    (select_by "search") or held-out score ("heldout"), among the records that may be chosen
    (scores.choice_score: full scores, or with subsets CMA-ES's means)."""
    def value(record):
        if choice_score(record) is None:
            return None
        return record.get("heldout_score") if select_by == "heldout" else choice_score(record)

    best = None
    for record in records:
        if value(record) is not None and (best is None or value(record) > value(best)):
            best = record
    return best


def latest_records(lines) -> list[dict[str, Any]]:
    """One record per candidate (generation, index): its last line, in first-seen order."""
    latest = {}
    for record in lines:
        latest[(record.get("generation"), record.get("index"))] = record
    return list(latest.values())


def _trim_unfinished_line(path: Path) -> None:
    """Cut a last line that a kill left unfinished, so the next record starts a line of
    its own (_read_jsonl stops at the first line it cannot parse)."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a file hotmerge appends to. A last line without its newline is one
    a kill cut short (that record never finished) and is left out; any other line that is
    not a JSON object means the file was changed, and is refused rather than skipped."""
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e}): restore it or pick a new --storage-path") from e
    records = []
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if last and not line:
            break
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            if last:
                break  # cut short by a kill
            raise ConfigError(f"{path} line {number} is not a record hotmerge wrote (the file was changed): "
                              "restore it, or pick a new --storage-path")
        records.append(record)
    return records


def _history_record(record: dict[str, Any]) -> bool:
    """What every history line holds: which candidate it is, its genotype, and a score that
    is a number or None (failed)."""
    score, told = record.get("score"), record.get("told")
    return (_integer(record.get("generation")) and record["generation"] >= 0 and _integer(record.get("index"))
            and _numbers(record.get("genotype")) and (score is None or _number(score))
            and (told is None or _number(told)))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(_number(v) for v in value)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
