"""The live display of a search (rich), plain lines where the output is no terminal, or only
failures (--quiet: the command prints the result alone)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from hotmerge.search.coordinator import Progress



def _fmt(score: float | None, stderr: float | None = None) -> str:
    """A score, with its standard error when known: the noise a difference must beat."""
    if score is None:
        return "-"
    return f"{score:.4f}" if stderr is None or stderr != stderr else f"{score:.4f} ± {stderr:.4f}"


def _evaluations(p: Progress) -> str:
    """evaluations/limit; the search stops only between generations, so the count may pass the limit."""
    text = f"{p.evaluations}/{p.max_fevals}"
    return text + " (a generation is finished whole)" if p.evaluations > p.max_fevals else text


def _which(record: dict) -> str:
    """The record, short: a generation's candidate or CMA-ES's mean (search/scores.py, describe)."""
    what = "CMA-ES mean" if record.get("xfavorite") else f"cand {record['index']}"
    return f"gen {record['generation']} {what}"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


class ProgressView:
    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self.plain = quiet or not console.is_terminal  # lines, not the live table
        self.live = None if self.plain else Live(console=console, refresh_per_second=4, transient=False)
        self._last_generation = None

    def __enter__(self):
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, p: Progress, record: dict) -> None:
        if self.live is not None:
            self.live.update(self._table(p))
            return
        if self.quiet and not record.get("error"):
            return
        line = (f"{_which(record)}: "
                f"score {_fmt(record.get('score'), record.get('stderr'))}  best {_fmt(p.best_score, p.best_stderr)}  "
                f"evals {_evaluations(p)}  {p.per_minute:.1f}/min  eta {_eta(p.eta_seconds)}")
        if record.get("stopped_early"):
            line += f"  (raced: stopped {record.get('race')} the best μ after {record.get('items')} items)"
        if record.get("error"):
            line += f"  FAILED: {record['error']}"
        self.console.print(line, highlight=False, soft_wrap=True)  # one line each, however narrow the console

    def heldout(self, record: dict) -> None:
        """A record re-scored on the held-out tasks."""
        what = _which(record)
        if record.get("heldout_score") is None:
            line = f"held-out: {what} FAILED: {record.get('heldout_error')}"
        elif self.quiet:
            return
        else:
            line = (f"held-out: {what}: {_fmt(record['heldout_score'], record.get('heldout_stderr'))} "
                    f"(search {_fmt(record.get('score'), record.get('stderr'))})")
        self.console.print(line, highlight=False, soft_wrap=True)

    def _table(self, p: Progress) -> Table:
        table = Table(title="hotmerge evolve", show_header=False)
        table.add_column(justify="right", style="bold")
        table.add_column()
        table.add_row("generation", str(p.generation))
        table.add_row("evaluations", _evaluations(p))
        table.add_row("best score", _fmt(p.best_score, p.best_stderr))
        table.add_row("last score", _fmt(p.last_score))
        table.add_row("failed", str(p.failures))
        table.add_row("candidates / min", f"{p.per_minute:.1f}")
        table.add_row("ETA", _eta(p.eta_seconds))
        return table
