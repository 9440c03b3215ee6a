"""What a history record's numbers mean, for whoever picks the best record."""

from __future__ import annotations

from typing import Any


def full_score(record: dict[str, Any]) -> float | None:
    """The record's score on every search item: None for an estimate on part of them (a raced
    candidate stopped early; a subset's or IRT's estimate that was not scored in full)."""
    if record.get("stopped_early"):
        return None
    if record.get("fitness") in ("subset", "irt"):
        return record.get("full_score")
    return record.get("score")
