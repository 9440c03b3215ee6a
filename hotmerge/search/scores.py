"""What a history record's numbers mean, for whoever picks the best record."""

from __future__ import annotations

from typing import Any


def describe(record: dict[str, Any]) -> str:
    """Which recipe a record is, in words: a generation's candidate, or CMA-ES's mean."""
    what = "CMA-ES's mean" if record.get("xfavorite") else f"candidate {record['index']}"
    return f"generation {record['generation']}, {what}"


def full_score(record: dict[str, Any]) -> float | None:
    """The record's score on every search item: None for an estimate on part of them (a raced
    candidate stopped early; a subset's or IRT's estimate)."""
    if record.get("stopped_early") or record.get("fitness") in ("subset", "irt"):
        return None
    return record.get("score")
