"""The finite-output check: a candidate that would write inf/NaN raises before anything is written.

A merged value can only be non-finite if a source is, or if the coefficients make
it overflow. `unproven_segments` bounds every segment's output from load-time maxima
(max |B|, max |delta|, max |X|) and the table; a segment whose bound is a finite
bf16/fp16 value cannot produce inf/NaN and is written directly. Only segments whose
bound fails are merged once more in a dry run (by the backend) that writes nothing
and tests isfinite; any non-finite value raises NonFiniteMergeError before a single
output element is written. So the common case costs no extra pass.
"""

from __future__ import annotations

import itertools
from typing import List, Sequence

import numpy as np
import torch

from .layout import FlatSources
from .table import CoefficientTable


class NonFiniteMergeError(ValueError):
    """A candidate would write inf/NaN; `segments` lists the offending indices."""

    def __init__(self, segments: Sequence[int], names: Sequence[str]):
        self.segments = list(segments)
        self.names = list(names)
        shown = ", ".join(f"{i} ({n})" if n else str(i) for i, n in zip(self.segments, self.names))
        super().__init__(f"merge produces non-finite values in segment(s) {shown}; output untouched")



def unproven_segments(flat: FlatSources, table: CoefficientTable, scale: np.ndarray) -> List[int]:
    """Segments whose output cannot be shown finite from load-time maxima."""
    st = flat.stats
    limit = 0.99 * torch.finfo(flat.dtype).max
    big = 1e37  # keep float32 intermediates far from overflow
    with np.errstate(all="ignore"):
        if table.combine or table.kind == "rows_combine":
            inner = (np.abs(table.coef.astype(np.float64)) * st.max_source).sum(1)
            bound = inner / np.abs(table.div.astype(np.float64))
        else:
            a = np.abs(scale.astype(np.float64)) * st.max_delta
            if table.kind in ("nearswap", "sce"):
                # nearswap's per-element weight lies in [0, 1]; sce averages the agreeing deltas
                # of the models with a weight
                a = st.max_delta.copy()
            a = np.where(scale == 0, 0.0, a)  # skipped models contribute nothing
            inner = a.sum(1)
            if not table.normalize:
                mixed = inner
            elif table.spec.consensus:
                w = table.weight.astype(np.float64)
                if (w >= 0).all():
                    # sum_S w r d / sum_S w is a weighted mean of r*d over selected models
                    r_d = np.where(w > 0, a / np.where(w > 0, w, 1.0), 0.0)
                    mixed = r_d.max(1)
                else:
                    mixed = inner / np.minimum(1.0, _min_subset_sum(w))
            else:
                mixed = inner / np.abs(table.div.astype(np.float64))
            bound = st.max_base + abs(table.lambda_) * mixed
        ok = np.isfinite(bound) & (bound * 1.001 <= limit) & np.isfinite(inner) & (inner <= big)
    return [j for j in range(len(flat.segments)) if not ok[j] and flat.segments[j].numel]



def _min_subset_sum(w: np.ndarray) -> np.ndarray:
    """Per row, min |sum over a nonempty subset| among the nonzero subset sums."""
    S, M = w.shape
    if M > 12:
        return np.zeros(S)  # too many subsets: prove nothing, dry-run instead
    best = np.full(S, np.inf)
    for r in range(1, M + 1):
        for sub in itertools.combinations(range(M), r):
            s = np.abs(w[:, list(sub)].sum(1))
            best = np.where(s > 0, np.minimum(best, s), best)
    return np.where(np.isfinite(best), best, 1.0)
