"""What a history record's numbers mean, for whoever picks the best record."""

from __future__ import annotations

from typing import Any


def full_score(record: dict[str, Any]) -> float | None:
    """The record's score on every search item: None for an estimate on part of them (a raced
    candidate stopped early; a subset's or IRT's estimate)."""
    if record.get("stopped_early") or record.get("fitness") in ("subset", "irt"):
        return None
    return record.get("score")
