"""What a history record's numbers mean, for whoever picks the best record."""

from __future__ import annotations

from typing import Any


def describe(record: dict[str, Any]) -> str:
    """Which recipe a record is, in words: a generation's candidate, or CMA-ES's mean (with the
    items it was scored on, when they are part of the pool)."""
    if not record.get("xfavorite"):
        return f"generation {record['generation']}, candidate {record['index']}"
    part = f", on its {record['items']} search items" if record.get("fitness") == "subset" else ""
    return f"generation {record['generation']}, CMA-ES's mean{part}"


def choice_score(record: dict[str, Any]) -> float | None:
    """The score best_config.yaml chooses by: a score on every search item, or CMA-ES's mean's
    score on its own fixed part of the pool (subsets with `mean_items` below 1, where
    every mean is scored on the same items and nothing else is scored in full). None for
    every other estimate on part of the items: a raced candidate stopped early, a subset's or
    IRT's estimate of a candidate."""
    if record.get("stopped_early"):
        return None
    if record.get("fitness") in ("subset", "irt") and not record.get("xfavorite"):
        return None
    return record.get("score")
