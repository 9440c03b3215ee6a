"""Evolve runs in tests: one config and command line, and history.jsonl read while a run
may still be writing it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

HOTMERGE = [sys.executable, "-m", "hotmerge"]
SEARCH_TASKS = ["toy_capital_mc_search", "toy_color_mc_search", "toy_sum_mc_search"]
HELDOUT_TASKS = ["toy_capital_mc_heldout", "toy_color_mc_heldout", "toy_sum_mc_heldout"]
FEVALS = 24  # four generations of six
SEED = 3


def search_config(family, path: Path, **genome) -> Path:
    """task_arithmetic over the toy experts: two layer groups, one filter set (S = 2)."""
    config = {
        "genome": {
            "models": [str(p) for p in family.experts],
            "base_model": str(family.base),
            "merge_method": "task_arithmetic",
            "layer_granularity": 2,
            "normalize": False,
            "filters": ["self_attn"],
            **genome,
        },
        # one task in the long form, as configs may write them
        "tasks": [*SEARCH_TASKS[:2], {"name": SEARCH_TASKS[2], "weight": 1.0}],
        "apply_chat_template": False,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def evolve_cmd(config: Path, run_dir: Path, fevals: int = FEVALS, *extra: str) -> list[str]:
    return [*HOTMERGE, "evolve", str(config), "--storage-path", str(run_dir), "--max-fevals", str(fevals),
            "--force-population-size", "6", "--random-seed", str(SEED), "--quiet", "--no-save-final-model",
            *extra]


def read_history(run_dir: Path, *, finished: bool = True) -> list[dict]:
    """The records of RUN_DIR/history.jsonl.

    finished=False reads a file that a run may be appending to (or that a kill cut short):
    what follows the last newline is a record still being written, and is left out.
    finished=True asserts there is no such tail. A complete line that does not parse is an
    error either way.
    """
    path = Path(run_dir) / "history.jsonl"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if finished:
            raise
        return []
    *lines, tail = data.split(b"\n")
    assert not (finished and tail), f"{path} ends with an unfinished line: {tail[:80]!r}"
    return [json.loads(line) for line in lines if line.strip()]


def wait_until(condition, *, timeout: float, process=None, poll: float = 0.05) -> bool:
    """Check condition() until it holds (True), `timeout` seconds pass or `process` ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process is not None and process.poll() is not None:
            return condition()
        time.sleep(poll)
    return False
