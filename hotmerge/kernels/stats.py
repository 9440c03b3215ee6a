"""Per-(segment, model) statistics, computed once when the sources are loaded.

Everything a candidate needs besides its own coefficients:

* Magnitude histograms. |x| of a bf16/fp16 value orders exactly as its low 15 bits
  (the "key"), so a histogram over the 32768 keys of |delta| gives the exact k-th
  largest |delta| for any k by a cumulative-count lookup: ties and breadcrumbs cut
  points (and how many elements of each cut bin mergekit keeps, see
  reference.RangeCut) cost a binary search per (segment, model) instead of a sort. Only the
  keys that occur are kept (keys ascending, cumulative counts, cumulative L1), so
  a histogram is a few KB. The cumulative L1 also gives the L1 norm of any kept
  key range, i.e. the rescale of a magnitude mask without another pass.
* L1 norm of each delta (the numerator of DARE/DELLA's rescale), max |delta|,
  max |base| and max |source| (for the non-finite bound in finite.py).
* SLERP constants: L2 norm of each source and the raw dot products between sources,
  so slerp of any pair is s0*a + s1*b with (s0, s1) from reference.slerp_coefficients.
  With a base, also the dot products between the deltas: the Gram matrices from which
  model_stock, nuslerp, multislerp and karcher take their coefficients
  (reference.stats_coefficients), so that no apply passes over a tensor to find them.
* DELLA rank codes: della ranks |delta| within rows, which a per-tensor histogram
  cannot give, so each element's 8-bit normalised row rank is stored (uint8, one
  byte per element and model, only when della is used); see reference.della_rank_codes.

delta here is always mergekit's delta: (X - B) rounded to the source dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from . import reference as R

CHUNK = 1 << 22  # elements per pass over a large segment (bounds scratch memory)


@dataclass
class MagnitudeHistogram:
    """Sorted distinct |delta| keys of one (segment, model) with cumulative sums."""

    keys: np.ndarray  # int64, ascending distinct keys
    cum: np.ndarray  # int64, cum[i] = number of elements with key <= keys[i]
    cum_l1: np.ndarray  # float64, sum of |delta| over elements with key <= keys[i]

    @property
    def n(self) -> int:
        return int(self.cum[-1]) if len(self.cum) else 0

    @property
    def l1(self) -> float:
        """sum of |delta| (bin by bin in ascending order, float64)."""
        return float(self.cum_l1[-1]) if len(self.cum_l1) else 0.0

    def counts(self) -> torch.Tensor:
        """The [32768] int64 bin counts this histogram was made from."""
        c = torch.zeros(R.KEY_MAX + 1, dtype=torch.int64)
        c[torch.from_numpy(self.keys)] = torch.from_numpy(np.diff(self.cum, prepend=0))
        return c

    @classmethod
    def from_counts(cls, counts: torch.Tensor, dtype: torch.dtype) -> "MagnitudeHistogram":
        counts = counts.cpu().to(torch.int64)
        keys = torch.nonzero(counts).reshape(-1)
        values = keys.to(torch.int16).view(dtype).double()  # |delta| of each key
        c = counts[keys]
        return cls(
            keys=keys.numpy(),
            cum=torch.cumsum(c, 0).numpy(),
            cum_l1=torch.cumsum(c.double() * values, 0).numpy(),
        )

    def key_at(self, rank: int) -> int:
        """Key of the element at ascending rank `rank` (0-based) in sorted order."""
        i = int(np.searchsorted(self.cum, rank, side="right"))
        return int(self.keys[i])

    def l1_between(self, lo: int, hi: int) -> float:
        """Sum of |delta| over elements whose key is in [lo, hi]."""
        if hi < lo or not len(self.keys):
            return 0.0
        a = int(np.searchsorted(self.keys, lo, side="left"))
        b = int(np.searchsorted(self.keys, hi, side="right"))
        if b <= a:
            return 0.0
        return float(self.cum_l1[b - 1] - (self.cum_l1[a - 1] if a > 0 else 0.0))

    def bin_span(self, key: int) -> tuple:
        """(first, last) ascending rank of the elements whose key is `key` (present)."""
        i = int(np.searchsorted(self.keys, key))
        return (int(self.cum[i - 1]) if i > 0 else 0), int(self.cum[i]) - 1

    def cut(self, sparsify: str, density: float, gamma: float = R.DEFAULT_GAMMA) -> R.RangeCut:
        """mergekit's magnitude / magnitude_outliers kept set (0 < density < 1)."""
        return R.magnitude_cut(sparsify, self.n, density, gamma, self.key_at, self.bin_span)

    def l1_kept(self, cut: R.RangeCut, dtype: torch.dtype) -> float:
        """mergekit's masked L1 for `cut`: inner bins plus its counts in the cut bins."""
        return (self.l1_between(cut.lo + 1, cut.hi - 1)
                + cut.n_lo * R.key_value(cut.lo, dtype) + cut.n_hi * R.key_value(cut.hi, dtype))


def _finite_max(x: torch.Tensor) -> float:
    """max |x|, inf when x holds a NaN or inf; 0 for empty."""
    if x.numel() == 0:
        return 0.0
    a = x.float().abs()
    return float(torch.nan_to_num(a, nan=float("inf")).amax())


@dataclass
class SourceStats:
    """Load-time statistics of a FlatSources layout (host arrays, S segments, M models)."""

    max_source: np.ndarray  # [S, M] max |X_m|
    max_base: Optional[np.ndarray] = None  # [S] max |B|
    max_delta: Optional[np.ndarray] = None  # [S, M] max |delta_m|
    l1: Optional[np.ndarray] = None  # [S, M] ||delta_m||_1 (float64)
    hist: Optional[List[List[MagnitudeHistogram]]] = None  # [S][M]
    norms: Optional[np.ndarray] = None  # [S, M] ||X_m||_2 (slerp)
    dots: Optional[np.ndarray] = None  # [S, M, M] raw X_i . X_j (slerp)
    delta_dots: Optional[np.ndarray] = None  # [S, M, M] delta_i . delta_j (with slerp and a base)
    rank_codes: Optional[torch.Tensor] = None  # [M, total] uint8 (della), flat's device
    extras: dict = field(default_factory=dict)


def compute_stats(flat, *, della: bool = False, slerp: bool = False, chunk: int = CHUNK) -> SourceStats:
    """One pass over every segment of a FlatSources (on its device).

    della: also build per-element rank codes (one byte per element and model).
    slerp: also the per-segment norms and dot products between all sources.
    """
    models, base = flat.models, flat.base
    S, M, dtype = len(flat.segments), flat.n_models, flat.dtype
    work = flat.stream_device or models.device  # streamed sources: each chunk computed there
    st = SourceStats(max_source=np.zeros((S, M)))
    if slerp:
        st.norms = np.zeros((S, M))
        st.dots = np.zeros((S, M, M))
    if slerp and base is not None:
        st.delta_dots = np.zeros((S, M, M))
    if base is not None:
        st.max_base = np.zeros(S)
        st.max_delta = np.zeros((S, M))
        st.l1 = np.zeros((S, M))
        st.hist = []
    if della:
        if base is None:
            raise ValueError("della rank codes need a base")
        st.rank_codes = torch.zeros(models.shape, dtype=torch.uint8, device=models.device,
                                     pin_memory=models.is_pinned())

    for j, seg in enumerate(flat.segments):
        counts = (
            torch.zeros((M, R.KEY_MAX + 1), dtype=torch.int64, device=work)
            if base is not None
            else None
        )
        for lo in range(0, seg.numel, chunk):
            hi = min(seg.numel, lo + chunk)
            a, b = seg.offset + lo, seg.offset + hi
            xs = models[:, a:b].to(work)
            for m in range(M):
                st.max_source[j, m] = max(st.max_source[j, m], _finite_max(xs[m]))
            if slerp:
                x64 = xs.double()
                st.dots[j] += (x64 @ x64.T).cpu().numpy()
            if base is None:
                continue
            bb = base[a:b].to(work).float()
            st.max_base[j] = max(st.max_base[j], _finite_max(bb))
            deltas = []
            for m in range(M):
                delta = (xs[m].float() - bb).to(dtype)
                if slerp:
                    deltas.append(delta.double())
                keys = R.magnitude_keys(delta)
                counts[m] += torch.bincount(keys, minlength=R.KEY_MAX + 1)
                st.max_delta[j, m] = max(st.max_delta[j, m], _finite_max(delta))
            if slerp:
                d64 = torch.stack(deltas)
                st.delta_dots[j] += (d64 @ d64.T).cpu().numpy()
        if slerp:
            st.norms[j] = np.sqrt(np.maximum(np.diag(st.dots[j]), 0.0))
        if base is not None:
            st.hist.append([MagnitudeHistogram.from_counts(counts[m], dtype) for m in range(M)])
            # from the histogram: the same float64 sum however the tensor is chunked or sharded
            st.l1[j] = [h.l1 for h in st.hist[j]]
        if della:
            _fill_rank_codes(flat, seg, st.rank_codes)
    return st


def _fill_rank_codes(flat, seg, codes: torch.Tensor, rows_per_chunk: Optional[int] = None) -> None:
    """Della's per-row rank codes of one segment, a bounded number of rows at a time."""
    if seg.numel == 0:
        return
    row_len = seg.row_len or seg.numel
    if seg.numel % row_len:
        raise ValueError(f"segment {seg.name!r}: row_len {row_len} does not divide {seg.numel}")
    rows_per_chunk = rows_per_chunk or max(1, CHUNK // row_len)
    n_rows = seg.numel // row_len
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        a, b = seg.offset + r0 * row_len, seg.offset + r1 * row_len
        work = flat.stream_device or flat.models.device
        bb = flat.base[a:b].to(work).float()
        for m in range(flat.n_models):
            delta = (flat.models[m, a:b].to(work).float() - bb).to(flat.dtype)
            codes[m, a:b] = R.della_rank_codes(R.magnitude_keys(delta), row_len).to(codes.device)
