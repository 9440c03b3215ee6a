"""Where hotmerge and mergekit may legitimately disagree in one merged tensor, and the
whole-model comparison built on it."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from hotmerge.kernels.methods import METHODS, Sparsification


def ambiguous_elements(method: str, params: dict, base: torch.Tensor, sources: list,
                       dtype: torch.dtype = torch.bfloat16, rescale: bool = False,
                       at: torch.Tensor | None = None) -> torch.Tensor:
    """Elements where the tools may differ: with sign consensus, where the kept terms
    nearly cancel (mergekit's bf16 sum may flip the majority sign); with magnitude
    pruning, elements whose |delta| equals a cut value (mergekit keeps exactly
    k by argsort, so among equal magnitudes it picks by position; hotmerge picks among
    them at random with the same expected count).

    params: the tensor's per-model parameters (weight, density, gamma), sources[i]
    the i-th model's tensor, base the base's; dtype: what the merge computes in;
    rescale: whether kept deltas are scaled by ||delta||_1 / ||kept||_1 (it moves the
    sign election, so the near-cancelling set must be found on the rescaled terms).
    at: a boolean mask of the tensor's shape, to answer for those elements only (flat, in
    order); the cut values and norms still come from the whole tensor."""
    spec = METHODS[method]
    pick = (lambda t: t) if at is None else (lambda t: t[at])
    shape = sources[0].shape if at is None else (int(at.sum()),)
    if method == "sce":
        return _sce_ambiguous(params, base, sources, dtype, pick)
    magnitude_cut = spec.sparsification in (Sparsification.magnitude, Sparsification.magnitude_outliers)
    if base is None or not (spec.consensus or magnitude_cut):
        return torch.zeros(shape, dtype=torch.bool)
    ambiguous = torch.zeros(shape, dtype=torch.bool)
    kept_terms, cut_terms = [], []
    for i, source in enumerate(sources):
        whole = (source.to(dtype).float() - base.to(dtype).float()).to(dtype).float()
        delta = pick(whole)
        term = float(params["weight"][i]) * delta
        density = float(params["density"][i]) if "density" in params else 1.0
        if density >= 1 or params["weight"][i] == 0 or not magnitude_cut:
            kept_terms.append(term)
            continue
        magnitudes = whole.abs().flatten()
        n = magnitudes.numel()
        keep = int(density * n)

        def ordered(rank: int) -> float:  # the rank-th smallest |delta| (0-based), without a sort
            return float(torch.kthvalue(magnitudes, rank + 1).values)

        if spec.sparsification is Sparsification.magnitude_outliers:
            n_top = int(float(params["gamma"][i]) * n)
            n_bot = n - keep - n_top
            if n_bot < 0:
                n_top, n_bot = n_top + n_bot, 0
            lo, hi = ordered(n_bot), ordered(n - n_top - 1)
        else:
            lo, hi = ordered(n - max(keep, 1)), float(magnitudes.max())
        magnitude = delta.abs()
        at_cut = (magnitude == lo) | (magnitude == hi)
        ambiguous |= at_cut
        if rescale:
            kept_l1 = magnitudes[(magnitudes >= lo) & (magnitudes <= hi)].sum()
            term = term * (magnitudes.sum() / kept_l1 if kept_l1 > 0 else 1.0)
        kept_terms.append(torch.where((magnitude > lo) & (magnitude < hi), term, 0.0))
        cut_terms.append(torch.where(at_cut, term.abs(), 0.0))
    if spec.consensus:
        kept = torch.stack(kept_terms)
        undecided = torch.stack(cut_terms).sum(0) if cut_terms else torch.zeros(shape)
        ambiguous |= kept.sum(0).abs() <= undecided + 2.0 ** -6 * kept.abs().sum(0)
    return ambiguous

def _sce_ambiguous(params: dict, base, sources: list, dtype, pick) -> torch.Tensor:
    """sce: elements whose variance equals the cut value (mergekit's topk picks among them by
    position, hotmerge at random), and selected deltas that nearly cancel (the sign may flip)."""
    from hotmerge.kernels import reference as R

    active = [s for s, a in zip(sources, params.get("active", [1] * len(sources))) if a]
    b = base.to(dtype).float()
    deltas = [(s.to(dtype).float() - b).to(dtype) for s in active]
    keys = R.sce_var_keys(deltas)
    cut = R.sce_cut(R.SceHistogram.from_deltas(keys, deltas), float(params["select_topk"][0]))
    keys = pick(keys.reshape(base.shape))
    at_cut = ((keys == cut.lo) & (0 < cut.q_lo < R.U24)) | ((keys == cut.hi) & (0 < cut.q_hi < R.U24))
    selected = (keys >= cut.lo) & (keys <= cut.hi)
    kept = torch.stack([torch.where(selected, pick(d.float()), 0.0) for d in deltas])
    return at_cut | (selected & (kept.sum(0).abs() <= 2.0 ** -6 * kept.abs().sum(0)))


ULPS = 4  # mergekit rounds to bf16 after every step, hotmerge once (see test_parity.py)


def folder_tensors(path) -> dict:
    """Every tensor of a model folder: its model.safetensors, or the shards its index names."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    tensors = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def assert_equal_to_mergekit(recipe, ours: dict, theirs: dict) -> None:
    """hotmerge's merge (ours) equals mergekit's (theirs) of the same merge config within bf16
    rounding, tensor for tensor, away from the elements where they may legitimately differ.
    Only the elements whose values differ are examined (most are equal bit for bit)."""
    sources = [folder_tensors(m) for m in recipe.models]
    base = folder_tensors(recipe.base_model) if recipe.base_model else None
    lam = abs(recipe.lambda_)
    bad_total = 0
    for name, a in ours.items():
        differ = a != theirs[name]
        if not differ.any():
            continue
        a32, b32 = a[differ].float(), theirs[name][differ].float()
        tolerance = ULPS * torch.maximum(a32.abs(), b32.abs()) * 2.0 ** -7
        if base is not None:
            # a few ulps of the terms mergekit sums in bf16 (they can dwarf the result)
            b0 = base[name][differ].float()
            deltas = sum((s[name][differ].float() - b0).abs() for s in sources)
            tolerance = tolerance + 2.0 ** -6 * max(1.0, lam) * deltas
        else:
            tolerance = tolerance + 2.0 ** -7 * sum(s[name][differ].float().abs() for s in sources)
        if recipe.method == "model_stock":
            tolerance = tolerance + _model_stock_terms(recipe, name, base[name], [s[name] for s in sources], differ)
        bad = (a32 - b32).abs() > tolerance
        if base is not None and bad.any():
            params = recipe.tensor(name).params if recipe.method != "slerp" else {}
            bad &= ~ambiguous_elements(recipe.method, params, base[name], [src[name] for src in sources],
                                       dtype=getattr(torch, recipe.dtype), rescale=recipe.rescale, at=differ)
        bad_total += int(bad.sum())
    assert bad_total == 0, f"{bad_total} elements differ from mergekit beyond bf16 rounding"


def _model_stock_terms(recipe, name: str, base: torch.Tensor, sources: list, at: torch.Tensor) -> torch.Tensor:
    """2 bf16 ulps of the terms mergekit's model_stock adds in bf16, t * mean(X) and
    (1 - t) * B: where a row's deltas nearly oppose (mean cosine near -1/(N-1)), |t| is large
    and those terms dwarf the result (t per row with filter_wise, else per tensor)."""
    from hotmerge.kernels import reference as R

    vs = [(x.float() - base.float()).to(base.dtype) for x in sources]
    if bool(recipe.tensor(name).params.get("filter_wise", [0.0])[0]):
        c = R.row_coefficients("model_stock", R.row_grams(vs), {})[:, 0]
        t = torch.from_numpy(c * len(vs)).float()[R.row_ids(torch.arange(base.numel()), base.shape)]
    else:
        t = torch.full((base.numel(),), float(R.model_stock_coefficients(R.gram(vs))[0] * len(vs)))
    t = t.view(base.shape)[at]
    mean = sum(x.float() for x in sources)[at] / len(sources)
    return 2.0 ** -6 * (t.abs() * mean.abs() + (1 - t).abs() * base.float()[at].abs())
