"""Per-tensor torch oracle: what one merge method does to one tensor.

Straightforward float32 code, written to equal mergekit 0.1.5 (the parity target)
and to be the definition that the fused engine (dispatch.py and its backends) must
reproduce. Inputs are bf16 (or fp16) tensors; the result has the input dtype.

Semantics, and where they knowingly differ from mergekit:

* Task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*):
  delta_i = X_i - B rounded to the working dtype, exactly as mergekit computes it in
  bf16. Everything after that is float32 with a single rounding at the end, where
  mergekit rounds to bf16 after every step; per-model weights (and DARE's density)
  are rounded to the working dtype first, because mergekit builds its weight tensor
  in that dtype (a configured weight of 0.3 acts as 0.30078125).
* Magnitude pruning keeps the ascending |delta| ranks [r0, r1] that mergekit's
  sorted slice keeps (ties: the top k = max(1, int(density * numel)); breadcrumbs'
  magnitude_outliers: between the dropped smallest and the dropped top gamma).
  Ranking uses the bit pattern of |delta| (|x| of a bf16/fp16 value orders as its
  15 low bits), so the fused engine finds the cut keys lo = key(r0), hi = key(r1)
  from a per-tensor histogram instead of a sort (stats.py). Every element strictly
  between lo and hi is kept. Elements whose key equals a cut key are where mergekit's
  argsort breaks ties by an implementation-defined order; deltas of bf16 weights are
  multiples of the weights' ulp, so such ties are common (a cut bin can hold a
  sizeable share of the kept elements). Keeping all of them would overshoot k, so
  each is kept with probability (mergekit's count in that bin) / (bin size), from
  the same counter-based random bits as DARE: the expected kept count is exactly
  mergekit's, and only which of the equal-magnitude elements survive differs.
  The rescale of a magnitude mask uses mergekit's exact kept L1 (bin counts times
  the bin's |delta|).
* Random masks (dare, della) come from a counter-based hash, not torch.bernoulli:
  the bit for element e of model m in tensor k under seed s is a pure function of
  (s, m, k, e), so the Triton kernel reproduces the mask bit for bit, nothing is
  stored, and every candidate sees the same random numbers. See `random_u24`.
  DARE's keep probability is density rounded to the working dtype (mergekit
  draws torch.bernoulli from a bf16 tensor).
* DELLA ranks |delta| within each row (mergekit argsorts along dim 1; a 1-D tensor
  is one row; tensors with more than 2 dims are viewed as [shape[0], -1], where
  mergekit's dim-1 ranking differs). The normalised rank (rank-1)/(C-1) is
  quantised to 8 bits (`della_rank_codes`), so a keep probability is off by at
  most epsilon/255; mergekit stores its ranks in bf16, whose spacing (16 at ranks
  2049..4096) is of the same order. Stable argsort breaks rank ties by position.
  A row of one element gets rank 0 (mergekit divides 0/0 there).
* Rescale (dare, della by default): masked * ||delta||_1 / ||masked||_1 with both
  L1 norms summed in float64, skipped when either is < 1e-7, as mergekit does.
* slerp: whole tensor as one vector (`slerp_tensor`); norms and the dot product in
  float64, the angle in float32 as mergekit does, result = s0*a + s1*b in float32.
* linear: sum_i w_i X_i (/ sum_i w_i when normalize) in float32, as mergekit does.
  The base is not an input of linear: pass it as a source if it should take part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

# The method table lives in methods.py (the one registry); re-exported for the kernels.
from .methods import (  # noqa: F401
    DEFAULT_EPSILON,
    DEFAULT_GAMMA,
    METHODS,
    SPARSE_NONE,
    SPARSE_RANDOM,
    SPARSE_RANGE,
    SPARSE_RANKED,
    MethodSpec,
    get_method,
)

RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps
LINEAR_DIV_EPS = 1e-8  # mergekit: |sum of weights| below this divides by 1
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
KEY_MAX = 0x7FFF  # largest |x| bit pattern of a 16-bit float (NaN patterns included)


# ---------------------------------------------------------------------------
# Counter-based random bits
#
# u24(e) = lowbias32((e * mult + k1) mod 2^32) >> 8, a 24-bit uniform integer.
# This is SplitMix's construction on 32-bit words: a counter times an odd per-stream
# multiplier ("gamma" in SplitMix) plus a per-stream offset, through a strong
# finalizer. lowbias32 is Wellons' xorshift-multiply hash (bijective on 32-bit
# words, avalanche bias ~0.17%). (k1, mult) come from splitmix64 over
# (seed, model key, tensor key), computed on the host; e is the element's flat index in its source tensor (< 2^32). A keep test
# is `u24 < threshold` with an integer threshold round(p * 2^24), so the torch and
# Triton paths agree bit for bit with no float comparisons.

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
U24 = 1 << 24


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def stream_keys(seed: int, model_key: int, tensor_key: int) -> tuple:
    """(k1, mult): offset and odd multiplier of the random stream of one
    (seed, model, tensor), as 32-bit words."""
    z = _splitmix64(int(seed) & MASK64)
    z = _splitmix64(z ^ (int(model_key) & MASK64))
    z = _splitmix64(z ^ (int(tensor_key) & MASK64))
    return z & MASK32, (z >> 32) | 1


def _i32(c: int) -> int:
    """A 32-bit word as the int32 with the same bits."""
    c &= MASK32
    return c - (1 << 32) if c >= 1 << 31 else c


def lowbias32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor of 32-bit words.

    int32 multiplication wraps modulo 2^32 in torch's kernels (only the bits
    matter); the right shifts are masked to make them logical."""
    x ^= (x >> 16) & 0xFFFF
    x *= _i32(0x7FEB352D)
    x ^= (x >> 15) & 0x1FFFF
    x *= _i32(0x846CA68B)
    x ^= (x >> 16) & 0xFFFF
    return x


def random_u24(index: torch.Tensor, k1: int, mult: int) -> torch.Tensor:
    """24-bit uniform integers (int32) for element indices `index` of one stream
    with offset k1 and odd multiplier mult (stream_keys)."""
    if index.dtype != torch.int32:
        x = index.to(torch.int64) & MASK32
        index = (x - ((x >> 31) << 32)).to(torch.int32)  # same low 32 bits, as int32
    x = index * _i32(mult)
    x += _i32(k1)
    lowbias32_(x)
    x >>= 8
    x &= 0xFFFFFF
    return x


def element_indices(start: int, stop: int, device=None) -> torch.Tensor:
    """Element indices [start, stop) for random_u24 (int32 bits when possible)."""
    if stop <= 1 << 31:
        return torch.arange(start, stop, dtype=torch.int32, device=device)
    return torch.arange(start, stop, dtype=torch.int64, device=device)


def prob_threshold(p: float) -> int:
    """Integer threshold t with P(u24 < t) = p (to 2^-25)."""
    return int(min(max(round(float(p) * U24), 0), U24))


# ---------------------------------------------------------------------------
# Small shared helpers


def round_param(value: float, dtype: torch.dtype) -> float:
    """A parameter as mergekit sees it after building a tensor of `dtype` from it."""
    return float(torch.tensor(float(value), dtype=torch.float64).to(dtype))


def magnitude_keys(delta: torch.Tensor) -> torch.Tensor:
    """|x| of a 16-bit float as its bit pattern (int32); orders exactly like |x|."""
    if delta.element_size() != 2 or not delta.is_floating_point():
        raise TypeError(f"magnitude keys need a 16-bit float tensor, got {delta.dtype}")
    return delta.contiguous().view(torch.int16).to(torch.int32) & KEY_MAX


def as_rows(t: torch.Tensor, row_len: int) -> torch.Tensor:
    return t.reshape(-1, row_len)


def default_row_len(shape: Sequence[int]) -> int:
    """Row length that della ranks over: the whole tensor if 1-D, else numel/shape[0]."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if len(shape) < 2 or numel == 0:
        return max(numel, 1)
    return numel // int(shape[0])


def last_dim(shape: Sequence[int]) -> int:
    """A tensor's last dimension (1 for a scalar): the rows arcee_fusion's softmax runs along,
    as mergekit's (dim=-1), whatever the tensor's rank."""
    return int(shape[-1]) if len(shape) else 1


def della_rank_codes(keys: torch.Tensor, row_len: int) -> torch.Tensor:
    """8-bit code of each element's normalised rank (rank-1)/(C-1) within its row.

    keys: magnitude keys (int) of one tensor, flat; row_len C divides numel.
    code = round(255 * r); rows of one element get code 0.
    """
    rows = as_rows(keys, row_len)
    c = rows.shape[1]
    if c <= 1:
        return torch.zeros(rows.numel(), dtype=torch.uint8, device=keys.device)
    order = torch.argsort(rows, dim=1, stable=True)
    rank0 = torch.empty_like(order)
    pos = torch.arange(c, device=keys.device).expand_as(order)
    rank0.scatter_(1, order, pos)
    # round half up of rank0 * 255 / (c - 1), in integers
    code = (rank0 * 510 + (c - 1)) // (2 * (c - 1))
    return code.to(torch.uint8).reshape(-1)


def della_thresholds(density: float, epsilon: float) -> tuple:
    """(p0, p1): keep iff u24 < p0 + p1 * code. Exact integer arithmetic (< 2^24)."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("Epsilon must be chosen such that density +/- epsilon is in (0, 1)")
    p0 = prob_threshold(density - epsilon)
    p1 = int(round(2.0 * epsilon / 255.0 * U24))
    p1 = min(p1, (U24 - p0) // 255)  # keep p0 + 255*p1 <= 2^24
    return p0, p1


def ties_rank_range(n: int, density: float) -> Optional[tuple]:
    """Ascending rank range [first, last] kept by mergekit.magnitude, or None for none.

    Only for 0 < density < 1 (callers handle the early returns)."""
    k = max(1, int(density * n))
    return (n - k, n - 1) if n > 0 else None


def outlier_rank_range(n: int, density: float, gamma: float) -> Optional[tuple]:
    """Ascending rank range kept by mergekit.magnitude_outliers (density < 1)."""
    target_n = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target_n - n_top)
    end = min(n_bot + target_n, n)
    if target_n <= 0 or end <= n_bot:
        return None
    return n_bot, end - 1


@dataclass(frozen=True)
class RangeCut:
    """A magnitude pruner's kept set: keys strictly inside (lo, hi), and elements
    with key == lo (== hi) when u24 < q_lo (q_hi). n_lo / n_hi: how many elements
    mergekit keeps in the lo / hi bins (n_hi = 0 when lo == hi)."""

    lo: int
    hi: int
    q_lo: int
    q_hi: int
    n_lo: int = 0
    n_hi: int = 0


KEEP_ALL = RangeCut(0, KEY_MAX, U24, U24)
KEEP_NONE = RangeCut(1, 0, 0, 0)


def range_cut(r0: int, r1: int, key_at, bin_span) -> RangeCut:
    """Cut for ascending ranks [r0, r1] given key_at(rank) -> key and
    bin_span(key) -> (first rank, last rank) of the elements with that key."""
    lo, hi = key_at(r0), key_at(r1)
    lo_first, lo_last = bin_span(lo)
    if lo == hi:
        n = r1 - r0 + 1
        q = prob_threshold(n / (lo_last - lo_first + 1))
        return RangeCut(lo, hi, q, q, n, 0)
    hi_first, hi_last = bin_span(hi)
    n_lo, n_hi = lo_last - r0 + 1, r1 - hi_first + 1
    return RangeCut(lo, hi, prob_threshold(n_lo / (lo_last - lo_first + 1)),
                    prob_threshold(n_hi / (hi_last - hi_first + 1)), n_lo, n_hi)


def magnitude_cut(sparsify: str, n: int, density: float, gamma: float, key_at, bin_span) -> RangeCut:
    """RangeCut of mergekit's magnitude / magnitude_outliers for 0 < density < 1."""
    if sparsify == "magnitude":
        ranks = ties_rank_range(n, density)
    else:
        ranks = outlier_rank_range(n, density, gamma)
    return KEEP_NONE if ranks is None else range_cut(ranks[0], ranks[1], key_at, bin_span)


def key_value(key: int, dtype: torch.dtype) -> float:
    """|delta| of a magnitude key."""
    return float(torch.tensor([key], dtype=torch.int16).view(dtype).double())


def range_keep(keys: torch.Tensor, u: torch.Tensor, cut: RangeCut) -> torch.Tensor:
    inside = (keys > cut.lo) & (keys < cut.hi)
    return inside | ((keys == cut.lo) & (u < cut.q_lo)) | ((keys == cut.hi) & (u < cut.q_hi))


def slerp_coefficients(t: float, norm_a: float, norm_b: float, dot_ab: float) -> tuple:
    """(s0, s1) as float32 values so that slerp(t, a, b) = s0*a + s1*b.

    norm_a, norm_b: L2 norms of a and b; dot_ab: their raw dot product (float64).
    The angle math is float32 torch, as in mergekit.slerp.
    """
    na = norm_a if norm_a > SLERP_EPS else 1.0
    nb = norm_b if norm_b > SLERP_EPS else 1.0
    dot = torch.tensor(dot_ab / (na * nb), dtype=torch.float32).clamp(-1, 1)
    t = torch.tensor(float(t), dtype=torch.float32)
    linear = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    s0 = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    s1 = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return float(s0), float(s1)


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32)


# ---------------------------------------------------------------------------
# Whole-tensor methods


def slerp_tensor(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp of two tensors, each taken as one vector."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    s0, s1 = slerp_coefficients(
        t, float(a64.norm()), float(b64.norm()), float(torch.dot(a64, b64))
    )
    out = a.float() * _f32(s0) + b.float() * _f32(s1)
    return out.to(a.dtype)


def linear_tensor(sources: Sequence[torch.Tensor], weights, normalize: bool) -> torch.Tensor:
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    acc = torch.zeros(sources[0].shape, dtype=torch.float32, device=sources[0].device)
    for x, wm in zip(sources, w):
        acc = acc + x.float() * wm
    if normalize:
        acc = acc / w.sum()
    return acc.to(sources[0].dtype)


def _per_model(params: Mapping, name: str, m: int, default=None) -> list:
    if name not in params:
        if default is None:
            raise ValueError(f"missing parameter {name!r}")
        return [float(default)] * m
    v = params[name]
    if torch.is_tensor(v):
        v = v.tolist()
    if isinstance(v, (int, float)):
        return [float(v)] * m
    v = [float(x) for x in v]
    if len(v) != m:
        raise ValueError(f"parameter {name!r} has {len(v)} values for {m} models")
    return v


def keep_mask(
    spec: MethodSpec,
    delta: torch.Tensor,
    density: float,
    *,
    gamma: float = DEFAULT_GAMMA,
    epsilon: float = DEFAULT_EPSILON,
    row_len: Optional[int] = None,
    seed: int = 0,
    model_key: int = 0,
    tensor_key: int = 0,
) -> tuple:
    """(keep, sparsified, l1_kept) for one delta (working dtype, any shape).

    keep: flat bool mask. sparsified: whether a mask applies at all (mergekit returns
    the delta untouched for density >= 1 and then does not rescale). l1_kept: the
    masked L1 norm the rescale divides by, when it is known exactly without the mask
    (magnitude pruners: mergekit's kept counts); None means sum it over `keep`.
    """
    n = delta.numel()
    flat = delta.reshape(-1)
    all_kept = torch.ones(n, dtype=torch.bool, device=delta.device)
    if spec.sparse_mode == SPARSE_NONE or density >= 1 or n == 0:
        return all_kept, False, None
    none_kept = torch.zeros_like(all_kept)
    if density <= 0 and spec.sparse_mode != SPARSE_RANDOM:
        return none_kept, False, None  # mergekit returns zeros_like (no rescale)
    k1, mult = stream_keys(seed, model_key, tensor_key)
    u = random_u24(element_indices(0, n, delta.device), k1, mult)
    if spec.sparse_mode == SPARSE_RANGE:
        keys = magnitude_keys(flat)
        ordered = torch.sort(keys).values

        def bin_span(k):
            first = int(torch.searchsorted(ordered, k, right=False))
            return first, int(torch.searchsorted(ordered, k, right=True)) - 1

        cut = magnitude_cut(spec.sparsify, n, density, gamma, lambda r: int(ordered[r]), bin_span)
        mags = flat.double().abs()
        l1_kept = float(mags[(keys > cut.lo) & (keys < cut.hi)].sum())
        l1_kept += cut.n_lo * key_value(cut.lo, delta.dtype) + cut.n_hi * key_value(cut.hi, delta.dtype)
        return range_keep(keys, u, cut), True, l1_kept
    if spec.sparse_mode == SPARSE_RANDOM:
        p = round_param(density, delta.dtype)
        return u < prob_threshold(p), True, None
    p0, p1 = della_thresholds(density, epsilon)
    codes = della_rank_codes(magnitude_keys(flat), row_len or default_row_len(delta.shape))
    return u < p0 + p1 * codes.to(torch.int64), True, None


def rescale_factor(delta: torch.Tensor, keep: torch.Tensor, l1_kept: Optional[float] = None) -> float:
    """mergekit's L1 rescale ||delta||_1 / ||masked||_1 (float64 sums), 1 if skipped."""
    a = delta.reshape(-1).double().abs()
    before = float(a.sum())
    after = float(a[keep.reshape(-1)].sum()) if l1_kept is None else l1_kept
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after


def merge_tensor(
    method: str,
    base: Optional[torch.Tensor],
    sources: Sequence[torch.Tensor],
    params: Mapping,
    *,
    normalize: bool,
    lambda_: float = 1.0,
    seed: int = 0,
    tensor_key: int = 0,
    model_keys: Optional[Sequence[int]] = None,
    rescale: Optional[bool] = None,
    row_len: Optional[int] = None,
) -> torch.Tensor:
    """Merge one tensor.

    method: a key of METHODS. base: the base model's tensor (slerp: its first
    input; linear: unused). sources: M tensors shaped like base (slerp: exactly
    one, the other endpoint). params: per-model lists (or scalars) "weight",
    "density", "gamma", "epsilon"; slerp takes scalar "t". rescale: None uses
    mergekit's default for the method. model_keys: random-stream key per source
    (default 0..M-1). row_len: della's ranking rows (default: see default_row_len).
    """
    spec = get_method(method)
    spec.refuse_unless_supported()
    if spec.engine == "stats":
        return stats_merge_tensor(method, base if spec.takes_base else None, sources, params)
    if spec.engine == "nearswap":
        return nearswap_tensor(float(params["t"]), base, sources[0])
    if spec.engine == "sce":
        return sce_tensor(base, sources, float(params.get("select_topk", 1.0)), seed=seed, tensor_key=tensor_key,
                          model_key=0 if model_keys is None else model_keys[0])
    if spec.engine == "ram":
        epsilon = float(params.get("epsilon", 1e-5))
        lambdas = None
        if method == "ramplus_tl":
            b = base.float()
            deltas = [(x.float() - b).to(base.dtype) for x in sources]
            shared, unique = ram_counts(deltas, ram_threshold(epsilon, base.dtype))
            lambdas = ramplus_lambdas(shared, unique, float(params.get("r", 0.1)), float(params.get("alpha", 0.2)),
                                      epsilon)
        return ram_tensor(base, sources, epsilon=epsilon, lambdas=lambdas)
    if spec.engine == "fusion":
        return fusion_tensor(base, sources[0], seed=seed, tensor_key=tensor_key)
    if method == "slerp":
        if len(sources) != 1:
            raise ValueError("slerp takes the base and exactly one other source")
        return slerp_tensor(float(params["t"]), base, sources[0])
    m = len(sources)
    weights = _per_model(params, "weight", m)
    if method == "linear":
        return linear_tensor(sources, weights, normalize)

    dtype = base.dtype
    if rescale is None:
        rescale = spec.default_rescale
    model_keys = list(range(m)) if model_keys is None else list(model_keys)
    density = _per_model(params, "density", m, default=1.0)
    gamma = _per_model(params, "gamma", m, default=DEFAULT_GAMMA)
    epsilon = _per_model(params, "epsilon", m, default=DEFAULT_EPSILON)
    w = [round_param(x, dtype) for x in weights]

    b = base.float()
    terms = []  # D_i = w_i * rescale_i * kept delta_i, float32
    for i, x in enumerate(sources):
        delta = (x.float() - b).to(dtype)  # mergekit's delta, in the working dtype
        keep, sparsified, l1_kept = keep_mask(
            spec, delta, density[i], gamma=gamma[i], epsilon=epsilon[i],
            row_len=row_len, seed=seed, model_key=model_keys[i], tensor_key=tensor_key,
        )
        keep = keep.reshape(delta.shape)
        r = rescale_factor(delta, keep, l1_kept) if (rescale and sparsified) else 1.0
        scale = _f32(w[i]) * _f32(r)
        terms.append(torch.where(keep, delta.float() * scale, 0.0))

    total = torch.zeros_like(b)
    for d in terms:
        total = total + d
    if spec.consensus:
        positive = total >= 0  # majority sign of the sum, ties count as +
        mixed = torch.zeros_like(b)
        divisor = torch.zeros_like(b)
        for d, wi in zip(terms, w):
            agree = torch.where(positive, d > 0, d < 0)  # sign(d) == majority
            mixed = mixed + torch.where(agree, d, 0.0)
            divisor = divisor + torch.where(agree, _f32(wi), 0.0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = total
        divisor = _f32(0.0)
        for wi in w:
            divisor = divisor + _f32(wi)
        if abs(float(divisor)) < LINEAR_DIV_EPS:
            divisor = _f32(1.0)
    if normalize:
        mixed = mixed / divisor
    mixed = mixed * _f32(lambda_)
    return (b + mixed).to(dtype)


# ---------------------------------------------------------------------------
# Methods whose merge is a linear combination with coefficients from each tensor's
# dot products (MethodSpec.engine == "stats"): model_stock, nuslerp, multislerp,
# karcher, passthrough. mergekit computes them from the whole tensor (flattened); the
# result is sum_i c_i v_i, where v_i are the sources (no base) or mergekit's deltas
# bf16(X_i - B) (with a base, then B is added). Only the Gram matrix G_ij = v_i . v_j
# (float64, computed once at load) enters the coefficients, so each method is an
# O(M^2) solve per tensor on the host, then one pass of the combine or task-arithmetic
# kernel. The coefficient maths is float64 where mergekit rounds its intermediates to
# the working dtype: the results agree within bf16 rounding, not bit for bit.


def gram(vectors: Sequence[torch.Tensor]) -> np.ndarray:
    """float64 Gram matrix of flattened tensors."""
    v = torch.stack([x.reshape(-1).double() for x in vectors]) if vectors else torch.zeros(0, 0)
    return (v @ v.T).numpy()


def _norm2(c: np.ndarray, g: np.ndarray) -> float:
    """||sum_i c_i v_i||, from the Gram matrix."""
    return float(np.sqrt(max(float(c @ g @ c), 0.0)))


def model_stock_coefficients(g: np.ndarray) -> np.ndarray:
    """mergekit's model_stock (filter_wise off) on N >= 2 deltas: B + sum_i c_i delta_i.

    t = N cos / (1 + (N - 1) cos) with cos the mean pairwise cosine of the deltas;
    the result t * mean(X_i) + (1 - t) * B is B + (t / N) * sum_i delta_i."""
    n = g.shape[0]
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    cos = [min(max(g[i, j] / max(norms[i] * norms[j], 1e-6), -1.0), 1.0)
           for i in range(n) for j in range(i + 1, n)]
    c = float(np.mean(cos))
    den = 1 + (n - 1) * c
    t = 0.0 if abs(den) < 1e-6 else n * c / den  # the singular case keeps the base
    return np.full(n, t / n)


def nuslerp_coefficients(weights: Sequence[float], g: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """mergekit's nuslerp (flattened) of two vectors: t = w1 / (w0 + w1), 0.5 when that
    sum is below 1e-6; slerp of the vectors themselves, lerp where they are colinear."""
    w0, w1 = float(weights[0]), float(weights[1])
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    n0, n1 = (max(float(np.sqrt(max(g[i, i], 0.0))), 1e-7) for i in (0, 1))
    cos = min(max(g[0, 1] / (n0 * n1), -1.0), 1.0)
    if 1 - cos * cos <= eps * eps:
        return np.array([1 - t, t])
    theta = math.acos(cos)
    s = math.sin(theta)
    return np.array([math.sin((1 - t) * theta) / s, math.sin(t * theta) / s])


def multislerp_weights(weights: Sequence[float], normalize: bool, dtype: torch.dtype) -> np.ndarray:
    """mergekit builds the weight tensor in the working dtype and normalises it there."""
    w = torch.tensor([float(x) for x in weights], dtype=dtype)
    if normalize:
        w = w / w.sum()
    return w.double().numpy()


class UndefinedMergeError(ValueError):
    """A method is undefined for these inputs, and mergekit raises there too (multislerp of
    three or more unit vectors whose weighted sum is zero). It says the candidate (its
    weights, or its models for that tensor) is bad, not that the code is."""


def multislerp_coefficients(weights: Sequence[float], g: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """mergekit's multislerp of N >= 2 vectors (weights as multislerp_weights gives them):
    the weighted mean of the unit vectors, projected to the tangent space there, mapped
    back with the exponential map, scaled by the weighted mean norm.

    Raises UndefinedMergeError where mergekit raises (weighted unit vectors that cancel,
    N > 2)."""
    w = np.asarray(weights, dtype=np.float64)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    inv = 1.0 / (norms + eps)  # unit_i = v_i * inv_i
    a = w * inv  # the mean sum_i w_i unit_i, as coefficients of the v_i
    mean_norm = _norm2(a, g)
    if mean_norm < eps:
        if len(w) == 2:
            return w.copy()  # mergekit falls back to the weighted sum
        raise UndefinedMergeError("multislerp: the weighted sum of the inputs' unit vectors is zero (every "
                                  "input equal to the base, or antipodal inputs with balancing weights), "
                                  "where mergekit raises too: use other weights or other models")
    m = a / mean_norm
    dots = (g @ m) * inv  # unit_i . mean
    tangent = a - float(np.sum(w * dots)) * m  # sum_i w_i (unit_i - dots_i mean)
    tn = _norm2(tangent, g) + eps
    return float(np.sum(norms * w)) * (m * math.cos(tn) + tangent * (math.sin(tn) / tn))


def karcher_coefficients(g: np.ndarray, max_iter: int = 10, tol: float = 1e-5,
                         dtype: torch.dtype = torch.float32) -> np.ndarray:
    """mergekit's karcher mean of N vectors with equal weights: the Riemannian mean of the
    unit vectors on the sphere (fixed-point iterations), scaled by the mean norm.

    Without a base nothing absorbs a scalar's error, so the scalars that mergekit rounds to
    the working dtype are rounded here too (torch.dot of 16-bit tensors returns a 16-bit
    value, and so do arccos, sin and their quotient; a float32 0-dim tensor times a 16-bit
    tensor is rounded to 16 bits first): the angle's steps and the final scale then equal
    mergekit's, and what remains is its elementwise rounding."""

    def scalar(x):  # a float32 0-dim tensor, as mergekit's norms are
        return torch.tensor(float(x), dtype=torch.float32)

    def times(x):  # float32 0-dim x times a `dtype` tensor: x is rounded to dtype first
        return float(scalar(x).to(dtype))

    n = g.shape[0]
    if n == 1:
        return np.ones(1)
    alphas = np.full(n, 1.0 / n)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return np.zeros(n)
    inv = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    a_valid = alphas[valid] / alphas[valid].sum()

    def unit(i):
        e = np.zeros(n)
        e[i] = inv[i]
        return e

    mean = np.zeros(n)
    for al, i in zip(a_valid, valid):
        mean += al * unit(i)
    mn = _norm2(mean, g)
    mean = unit(valid[0]) if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = np.zeros(n)
        gm = g @ mean
        for al, i in zip(a_valid, valid):
            dot = torch.clamp(scalar(gm[i] * inv[i]).to(dtype), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            factor = float(al * (theta / torch.sin(theta)))
            tangent += factor * (unit(i) - float(dot) * mean)
        tn = _norm2(tangent, g)
        if tn < tol:
            break
        tn32 = scalar(tn)
        mean = times(torch.cos(tn32)) * mean + times(torch.sin(tn32)) * (tangent / float(tn32))
        un = _norm2(mean, g)
        if un > tol:
            mean = mean / un
    scale = sum(float(al) * scalar(nm) for al, nm in zip(alphas, norms))
    return times(scale) * mean


def karcher_tensor_coefficients(tensors: Sequence[torch.Tensor], max_iter: int = 10,
                                tol: float = 1e-5) -> np.ndarray:
    """karcher_coefficients' decisions taken on the tensors themselves, in their dtype.

    In 16 bits, mergekit's dot products round to 2^-8 near 1, and an input whose dot with
    the running mean rounds to 1 is skipped for that step: on nearly parallel tensors that
    decision turns on the last bit of the rounded mean, which only the rounded mean itself
    gives. So this runs mergekit's iteration on the tensors (once per tensor, at load: the
    method has nothing a candidate changes) and follows each step's scalars with the
    coefficients of the mean; the result is sum_i c_i X_i, off mergekit's only by its
    elementwise rounding."""
    n = len(tensors)
    if n == 1:
        return np.ones(1)
    dtype = tensors[0].dtype
    norms = [torch.linalg.vector_norm(t.float()) for t in tensors]
    units = [torch.zeros_like(t) if float(nm) == 0.0 else (t / nm).to(dtype) for t, nm in zip(tensors, norms)]
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return np.zeros(n)
    alphas = [1.0 / n] * n
    total = sum(alphas[i] for i in valid)
    a_valid = [alphas[i] / total for i in valid]

    def unit(i):  # coefficients of unit i (the division by the float32 norm is not rounded)
        e = np.zeros(n)
        e[i] = 1.0 / float(norms[i]) if float(norms[i]) != 0.0 else 0.0
        return e

    mean, cm = torch.zeros_like(units[valid[0]]), np.zeros(n)
    for al, i in zip(a_valid, valid):
        mean += al * units[i]
        cm += al * unit(i)
    mn = torch.linalg.vector_norm(mean.float())
    if mn.item() < tol:
        mean, cm = units[valid[0]].clone(), unit(valid[0])
    else:
        mean, cm = (mean / mn).to(dtype), cm / float(mn)
    for _ in range(max_iter):
        tangent, ct = torch.zeros_like(mean), np.zeros(n)
        for al, i in zip(a_valid, valid):
            dot = torch.clamp(torch.dot(mean.flatten(), units[i].flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            factor = al * (theta / torch.sin(theta))
            tangent += factor * (units[i] - dot * mean)
            ct += float(factor) * (unit(i) - float(dot) * cm)
        tn = torch.linalg.vector_norm(tangent.float())
        if tn.item() < tol:
            break
        cos_t, sin_t = torch.cos(tn), torch.sin(tn)
        mean = (cos_t * mean + sin_t * (tangent / tn)).to(dtype)
        # a float32 0-dim tensor times a 16-bit tensor is rounded to 16 bits first
        cm = float(cos_t.to(dtype)) * cm + float(sin_t.to(dtype)) * (ct / float(tn))
        un = torch.linalg.vector_norm(mean.float())
        if un.item() > tol:
            mean, cm = (mean / un).to(dtype), cm / float(un)
    scale = sum(al * nm for al, nm in zip(alphas, norms))
    return float(scale.to(dtype)) * cm


def stats_coefficients(method: str, g: np.ndarray, params: Mapping, dtype: torch.dtype) -> np.ndarray:
    """Coefficients of one tensor's merge over its N active inputs (params: per-input
    values for those inputs, shared ones as scalars)."""
    n = g.shape[0]
    if method == "model_stock":
        return model_stock_coefficients(g)
    if method == "nuslerp":
        return nuslerp_coefficients(params["weight"], g)
    if method == "multislerp":
        if n == 1:
            return np.ones(1)
        w = multislerp_weights(params["weight"], bool(params.get("normalize_weights", True)), dtype)
        return multislerp_coefficients(w, g, float(params.get("eps", 1e-8)))
    if method == "karcher":
        return karcher_coefficients(g, int(params.get("max_iter", 10)), float(params.get("tol", 1e-5)), dtype)
    if method == "passthrough":
        scale = params.get("scale")
        return np.array([1.0 if scale is None or np.isnan(scale[0]) else float(scale[0])])
    raise ValueError(f"{method} is not a statistics method")


def stats_merge_tensor(method: str, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor],
                       params: Mapping) -> torch.Tensor:
    """One tensor of a "stats" method: sources are the active inputs, base the base (None
    without one). With a base the result is B + sum_i c_i delta_i, else sum_i c_i X_i,
    in float32 rounded once."""
    dtype = sources[0].dtype
    with_base = base is not None and not (method == "multislerp" and len(sources) == 1)
    if with_base:
        b = base.float()
        vs = [(x.float() - b).to(dtype) for x in sources]
    else:
        vs = list(sources)
    if method == "karcher":
        c = karcher_tensor_coefficients(vs, int(params.get("max_iter", 10)), float(params.get("tol", 1e-5)))
    else:
        c = stats_coefficients(method, gram(vs), params, dtype)
    acc = torch.zeros(sources[0].shape, dtype=torch.float32)
    for v, ci in zip(vs, c):
        acc = acc + v.float() * _f32(ci)
    return (b + acc if with_base else acc).to(dtype)


def _rows(x: torch.Tensor, columns: bool) -> torch.Tensor:
    """mergekit's per-row vectors of x as a [R, C] view: those along the last dim (a 1-D
    tensor is one row), or with `columns` those along the first (nuslerp_row_wise)."""
    if x.dim() < 2:
        return x.reshape(1, -1)
    if columns:
        x = x.transpose(0, -1)
    return x.reshape(-1, x.shape[-1])


def row_grams(vectors: Sequence[torch.Tensor], columns: bool = False) -> np.ndarray:
    """[R, N, N] float64 Gram matrices of the vectors' rows (see _rows)."""
    v = torch.stack([_rows(x, columns).double() for x in vectors])
    return torch.einsum("irc,jrc->rij", v, v).numpy()


def row_count(shape: Sequence[int], columns: bool = False) -> int:
    """How many of mergekit's per-row vectors (_rows) a tensor of `shape` has."""
    if len(shape) < 2:
        return 1
    numel = int(np.prod(shape, dtype=np.int64))
    return numel // int(shape[0] if columns else shape[-1]) if numel else 0


def row_ids(elements: torch.Tensor, shape: Sequence[int], columns: bool = False) -> torch.Tensor:
    """The row (_rows) of each element, given by its index in the whole (row-major) tensor:
    along the last dim, e // last; with `columns` the rows of x.transpose(0, -1), where an
    element of [d0, ..., dk] at (i0, rest) lies in row (rest % dk) * (rest_len / dk) + rest // dk."""
    e = elements.long()
    if len(shape) < 2:
        return torch.zeros_like(e)
    last = int(shape[-1])
    if not columns:
        return e // last
    rest_len = int(np.prod(shape[1:], dtype=np.int64))
    rest = e % rest_len
    return (rest % last) * (rest_len // last) + rest // last


def row_coefficients(method: str, g: np.ndarray, params: Mapping) -> np.ndarray:
    """[R, N] coefficients of each row's merge from its Gram matrix g [R, N, N]:
    stats_coefficients row by row (model_stock with filter_wise, nuslerp with
    nuslerp_flatten false), vectorised over the rows."""
    n = g.shape[1]
    diag = np.sqrt(np.maximum(np.diagonal(g, axis1=1, axis2=2), 0.0))  # [R, N] norms
    if method == "model_stock":
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        cos = np.stack([np.clip(g[:, i, j] / np.maximum(diag[:, i] * diag[:, j], 1e-6), -1.0, 1.0)
                        for i, j in pairs], axis=1)
        c = cos.mean(axis=1)
        den = 1 + (n - 1) * c
        singular = np.abs(den) < 1e-6  # keeps the base
        t = np.where(singular, 0.0, n * c / np.where(singular, 1.0, den))
        return np.repeat((t / n)[:, None], n, axis=1)
    if method == "nuslerp":
        w0, w1 = (float(w) for w in params["weight"])
        total = w0 + w1
        t = 0.5 if abs(total) < 1e-6 else w1 / total
        n0, n1 = np.maximum(diag[:, 0], 1e-7), np.maximum(diag[:, 1], 1e-7)
        cos = np.clip(g[:, 0, 1] / (n0 * n1), -1.0, 1.0)
        colinear = 1 - cos * cos <= 1e-8 ** 2
        theta = np.arccos(np.where(colinear, 0.0, cos))
        s = np.where(colinear, 1.0, np.sin(theta))
        return np.stack([np.where(colinear, 1 - t, np.sin((1 - t) * theta) / s),
                         np.where(colinear, t, np.sin(t * theta) / s)], axis=1)
    raise ValueError(f"{method} has no per-row form")


def stats_merge_rows(method: str, base: Optional[torch.Tensor], sources: Sequence[torch.Tensor],
                     params: Mapping, columns: bool = False) -> torch.Tensor:
    """stats_merge_tensor row by row: model_stock with filter_wise, nuslerp with
    nuslerp_flatten false (columns: nuslerp_row_wise). Each row r is sum_i c_ri v_ri with
    its coefficients from its own Gram matrix (row_coefficients); float32, rounded once."""
    dtype, shape = sources[0].dtype, sources[0].shape
    if base is not None:
        b = base.float()
        vs = [(x.float() - b).to(dtype) for x in sources]
    else:
        vs = list(sources)
    c = torch.from_numpy(row_coefficients(method, row_grams(vs, columns), params)).float()
    rows = row_ids(torch.arange(sources[0].numel()), shape, columns)
    acc = torch.zeros(sources[0].numel(), dtype=torch.float32)
    for i, v in enumerate(vs):
        acc = acc + v.reshape(-1).float() * c[rows, i]
    acc = acc.reshape(shape)
    return (b + acc if base is not None else acc).to(dtype)


def nearswap_tensor(t: float, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mergekit's nearswap: each element moves from the base towards x by the weight
    clamp(t / |x - B|, 0, 1) (|x - B| at least 1e-6), so elements that differ by less
    than t take x's value. delta is mergekit's bf16(X - B); float32, rounded once."""
    b = base.float()
    d = (x.float() - b).to(x.dtype).float()
    w = torch.clamp(_f32(t) / torch.clamp(d.abs(), min=1e-6), 0.0, 1.0)
    return (b + d * w).to(x.dtype)


# ---------------------------------------------------------------------------
# Methods with a per-element rule of their own: sce, ram, ramplus_tl (own kernel
# branches) and arcee_fusion (a keep code per element, computed at load).


def _round_f32(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values rounded to `dtype` (to nearest even), kept as float32."""
    return x.to(dtype).float()


def sce_var_keys(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Magnitude key of mergekit's torch.var(task_vectors, dim=0, unbiased=False) per element.

    torch computes the variance of 16-bit tensors in float64 and rounds it to the tensor's
    dtype (through float32); this takes the mean and the squared deviations in float64,
    model after model, and rounds the same way, so the fused kernels compute the very same
    keys (a float64 result that differs from torch's in its last bits rounds alike but for
    a chance of about 2^-40 per element)."""
    dtype = deltas[0].dtype
    total = torch.zeros(deltas[0].shape, dtype=torch.float64)
    for d in deltas:
        total = total + d.double()
    mean = total / len(deltas)
    dev = torch.zeros_like(total)
    for d in deltas:
        dev = dev + (d.double() - mean) * (d.double() - mean)
    var = (dev / len(deltas)).float().to(dtype)
    return magnitude_keys(var.reshape(-1))


@dataclass
class SceHistogram:
    """One tensor's variance keys (ascending, distinct) with their element counts and, per
    model, the sum of mergekit's squared deltas (rounded to the working dtype) over them."""

    keys: np.ndarray  # int64 [K]
    cum: np.ndarray  # int64 [K] cumulative counts
    sq: np.ndarray  # float64 [M, K] sum of d^2 per key (not cumulative)

    @classmethod
    def from_deltas(cls, keys: torch.Tensor, deltas: Sequence[torch.Tensor]) -> "SceHistogram":
        counts, sq = sce_bins(keys, deltas)
        return cls.from_bins(counts, sq)

    @classmethod
    def from_bins(cls, counts: torch.Tensor, sq: torch.Tensor) -> "SceHistogram":
        present = torch.nonzero(counts).reshape(-1)
        return cls(keys=present.cpu().numpy(), cum=torch.cumsum(counts[present], 0).cpu().numpy(),
                   sq=sq[:, present].cpu().numpy())

    @property
    def n(self) -> int:
        return int(self.cum[-1]) if len(self.cum) else 0

    def key_at(self, rank: int) -> int:
        return int(self.keys[int(np.searchsorted(self.cum, rank, side="right"))])

    def bin_span(self, key: int) -> tuple:
        i = int(np.searchsorted(self.keys, key))
        return (int(self.cum[i - 1]) if i > 0 else 0), int(self.cum[i]) - 1

    def nonzero(self) -> int:
        return self.n - (int(self.cum[0]) if len(self.keys) and self.keys[0] == 0 else 0)


def sce_bins(keys: torch.Tensor, deltas: Sequence[torch.Tensor]) -> tuple:
    """(counts [KEY_MAX+1] int64, sq [M, KEY_MAX+1] float64) of one chunk of a tensor."""
    counts = torch.bincount(keys, minlength=KEY_MAX + 1)
    sq = torch.stack([torch.bincount(keys, weights=(d.reshape(-1) * d.reshape(-1)).double(), minlength=KEY_MAX + 1)
                      for d in deltas])
    return counts, sq


def sce_cut(hist: SceHistogram, select_topk: float) -> RangeCut:
    """mergekit's sce_mask as a RangeCut of the variance keys: the top
    k = int(count_nonzero(var) * select_topk) variances (all for select_topk >= 1, none for
    <= 0). Elements whose variance equals the cut value are kept at random in the share
    that keeps exactly mergekit's expected count (the tie rule of the magnitude cuts)."""
    if select_topk >= 1:
        return KEEP_ALL
    k = int(hist.nonzero() * select_topk) if select_topk > 0 else 0
    if k <= 0:
        return KEEP_NONE
    return range_cut(hist.n - k, hist.n - 1, hist.key_at, hist.bin_span)


def sce_weights(hist: SceHistogram, cut: RangeCut, numel: int, dtype: torch.dtype) -> np.ndarray:
    """mergekit's sce_weight of the selected deltas: mean of the squared deltas per model
    over the whole tensor, normalised by their sum, each step rounded to the working dtype.
    The cut bins count by their kept share (n_lo, n_hi of the bin's elements)."""
    m = hist.sq.shape[0]
    if cut is KEEP_NONE or numel == 0:
        sums = np.zeros(m)
    elif cut is KEEP_ALL:
        sums = hist.sq.sum(1)
    else:
        sums = hist.sq[:, (hist.keys > cut.lo) & (hist.keys < cut.hi)].sum(1)
        for key, kept in ((cut.lo, cut.n_lo), (cut.hi, cut.n_hi)):
            if kept:
                first, last = hist.bin_span(key)
                sums = sums + hist.sq[:, int(np.searchsorted(hist.keys, key))] * (kept / (last - first + 1))
    weights = torch.tensor(sums / max(numel, 1), dtype=torch.float64).float().to(dtype)
    total = float(weights.sum())
    if abs(total) < 1e-6:
        return (torch.ones(m, dtype=dtype) / m).double().numpy()
    return (weights / total).double().numpy()


def sce_tensor(base: torch.Tensor, sources: Sequence[torch.Tensor], select_topk: float, *, seed: int = 0,
               tensor_key: int = 0, model_key: int = 0) -> torch.Tensor:
    """SCE (mergekit's sce_merge): select the elements of highest variance across the
    models' deltas (select_topk), elect a sign per element from the sum of the selected
    deltas, and average the agreeing deltas weighted by each model's mean squared selected
    delta; the divisor is at least 1e-6. float32, rounded once; the random bits of the
    cut's tie rule are model_key's stream."""
    dtype, n = base.dtype, base.numel()
    b = base.float()
    deltas = [(x.float() - b).to(dtype) for x in sources]
    keys = sce_var_keys(deltas)
    hist = SceHistogram.from_deltas(keys, deltas)
    cut = sce_cut(hist, select_topk)
    w = sce_weights(hist, cut, n, dtype)
    k1, mult = stream_keys(seed, model_key, tensor_key)
    keep = range_keep(keys, random_u24(element_indices(0, n), k1, mult), cut).reshape(base.shape)
    return sce_combine(b, deltas, keep, w).to(dtype)


def sce_combine(b: torch.Tensor, deltas: Sequence[torch.Tensor], keep: torch.Tensor, weights) -> torch.Tensor:
    """sce's merge of the selected deltas (float32, before the final rounding): the sign of
    their sum elects (ties count as +), the agreeing ones are averaged with the weights."""
    kept = [torch.where(keep, d.float(), 0.0) for d in deltas]
    total = torch.zeros_like(b)
    for d in kept:
        total = total + d
    positive = total >= 0
    mixed, divisor = torch.zeros_like(b), torch.zeros_like(b)
    for d, wm in zip(kept, weights):
        agree = torch.where(positive, d > 0, d < 0)
        mixed = mixed + torch.where(agree, d * _f32(wm), 0.0)
        divisor = divisor + torch.where(agree, _f32(wm), 0.0)
    return b + mixed / torch.clamp(divisor, min=1e-6)


def ram_threshold(epsilon: float, dtype: torch.dtype) -> int:
    """mergekit's |delta| > epsilon compares in the working dtype: delta's key > this
    (-1: every delta counts, for a negative epsilon)."""
    e = round_param(epsilon, dtype)
    return -1 if e < 0 else int(magnitude_keys(torch.tensor([e], dtype=dtype))[0])


def ram_counts(deltas: Sequence[torch.Tensor], threshold: int) -> tuple:
    """(shared, unique) per model: its deltas above the threshold where another model's is
    too, and where no other model's is (ramplus_tl's rho, counted once at load)."""
    nz = torch.stack([magnitude_keys(d.reshape(-1)) > threshold for d in deltas])
    c = nz.sum(0)
    return (nz & (c > 1)).sum(1).tolist(), (nz & (c == 1)).sum(1).tolist()


def ramplus_lambdas(shared: Sequence[int], unique: Sequence[int], r: float, alpha: float,
                    epsilon: float) -> np.ndarray:
    """mergekit's lambda_ = 1 + r * clamp(shared / clamp(unique, min=epsilon), 0, alpha),
    with its own torch operations (float32)."""
    s, u = torch.tensor(list(shared), dtype=torch.int64), torch.tensor(list(unique), dtype=torch.int64)
    rho = s / u.clamp(min=epsilon)
    return (1 + r * rho.clamp(min=0, max=alpha)).double().numpy()


def ram_tensor(base: torch.Tensor, sources: Sequence[torch.Tensor], *, epsilon: float = 1e-5,
               lambdas: Optional[Sequence[float]] = None) -> torch.Tensor:
    """RAM (lambdas None) and RAM+ tensor-local (lambdas from ramplus_lambdas), as mergekit:
    where exactly one model's delta exceeds epsilon, that delta (times its lambda); where
    several do, the sum of each rounded delta / count. RAM rounds the sum to the working
    dtype before adding the base (its sum is in that dtype); RAM+ adds in float32. Then
    rounded once."""
    dtype = base.dtype
    b = base.float()
    deltas = [(x.float() - b).to(dtype) for x in sources]
    plus = lambdas is not None
    return ram_combine(b, deltas, ram_threshold(epsilon, dtype), lambdas if plus else [1.0] * len(deltas),
                       plus=plus).to(dtype)


def ram_combine(b: torch.Tensor, deltas: Sequence[torch.Tensor], threshold: int, lambdas, *,
                plus: bool) -> torch.Tensor:
    """RAM's merge of the deltas (float32, before the final rounding)."""
    dtype = deltas[0].dtype
    nz = [magnitude_keys(d.reshape(-1)).reshape(d.shape) > threshold for d in deltas]
    count = torch.zeros(b.shape, dtype=torch.int32, device=b.device)
    for z in nz:
        count = count + z.to(torch.int32)
    c = torch.clamp(count.float(), min=1.0)
    total = torch.zeros_like(b)
    for d, z, lam in zip(deltas, nz, lambdas):
        unique = d.float() * _f32(lam)
        shared = _round_f32(d.float() / c, dtype)
        total = total + torch.where(z & (count == 1), unique, torch.where(z & (count > 1), shared, 0.0))
    if not plus:
        total = _round_f32(total, dtype)  # RAM sums in the working dtype
    return b + total


FUSION_SAMPLE = 1_000_000  # mergekit's _QUANTILE_SAMPLE_SIZE


def fusion_generator(seed: int, tensor_key: int) -> torch.Generator:
    """The generator of arcee_fusion's sample for one tensor: keyed by (seed, tensor)."""
    return torch.Generator().manual_seed(stream_keys(seed, -1, tensor_key)[0])


def fusion_keep(base: torch.Tensor, x: torch.Tensor, row_len: int, generator: torch.Generator) -> torch.Tensor:
    """arcee_fusion's keep mask (flat bool) with mergekit's own operations: importance
    |X - B| times the KL divergence of softmax(X) from softmax(B) along each row of
    row_len elements (mergekit: the last dimension), kept where it reaches
    median + 1.5 (q3 - q1). On more than FUSION_SAMPLE elements mergekit takes those
    quantiles from a random sample drawn with replacement from its global RNG: here the
    same draw comes from `generator` (fusion_generator), so the threshold has mergekit's
    distribution (and equals it for the same random state) and is reproducible."""
    import torch.nn.functional as fn

    rows = max(1, x.numel() // max(row_len, 1))
    params, b = x.reshape(rows, -1), base.reshape(rows, -1)
    diff = (params - b).abs()
    p = fn.softmax(params, dim=-1) + 1e-8
    q = fn.softmax(b, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > FUSION_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (FUSION_SAMPLE,), generator=generator).to(flat.device)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long().to(flat.device)]
    threshold = median + 1.5 * (q3 - q1)
    return (importance >= threshold).reshape(-1)


def fusion_tensor(base: torch.Tensor, x: torch.Tensor, *, seed: int = 0, tensor_key: int = 0) -> torch.Tensor:
    """arcee_fusion: B + (X - B) where fusion_keep, B elsewhere; rows along the last dimension
    (not della's row_len: on tensors of 3 or more dimensions the two differ)."""
    keep = fusion_keep(base, x, last_dim(x.shape), fusion_generator(seed, tensor_key))
    b = base.float()
    d = (x.float() - b).to(x.dtype).float()
    return (b + torch.where(keep.reshape(x.shape), d, 0.0)).to(x.dtype)
