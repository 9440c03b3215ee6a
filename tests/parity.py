"""Where hotmerge and mergekit may legitimately disagree in one merged tensor."""

import torch

from hotmerge.kernels.methods import METHODS, Sparsification


def ambiguous_elements(method: str, params: dict, base: torch.Tensor, sources: list,
                       dtype: torch.dtype = torch.bfloat16, rescale: bool = False) -> torch.Tensor:
    """Elements where the tools may differ: with sign consensus, where the kept terms
    nearly cancel (mergekit's bf16 sum may flip the majority sign); with magnitude
    pruning, elements whose |delta| equals a cut value (mergekit keeps exactly
    k by argsort, so among equal magnitudes it picks by position; hotmerge picks among
    them at random with the same expected count).

    params: the tensor's per-model parameters (weight, density, gamma), sources[i]
    the i-th model's tensor, base the base's; dtype: what the merge computes in;
    rescale: whether kept deltas are scaled by ||delta||_1 / ||kept||_1 (it moves the
    sign election, so the near-cancelling set must be found on the rescaled terms)."""
    spec = METHODS[method]
    shape = sources[0].shape
    magnitude_cut = spec.sparsification in (Sparsification.magnitude, Sparsification.magnitude_outliers)
    if base is None or not (spec.consensus or magnitude_cut):
        return torch.zeros(shape, dtype=torch.bool)
    ambiguous = torch.zeros(shape, dtype=torch.bool)
    kept_terms, cut_terms = [], []
    for i, source in enumerate(sources):
        delta = (source.to(dtype).float() - base.to(dtype).float()).to(dtype).float()
        term = float(params["weight"][i]) * delta
        density = float(params["density"][i]) if "density" in params else 1.0
        if density >= 1 or params["weight"][i] == 0 or not magnitude_cut:
            kept_terms.append(term)
            continue
        ordered = delta.abs().flatten().sort().values
        n = ordered.numel()
        keep = int(density * n)
        if spec.sparsification is Sparsification.magnitude_outliers:
            n_top = int(float(params["gamma"][i]) * n)
            n_bot = n - keep - n_top
            if n_bot < 0:
                n_top, n_bot = n_top + n_bot, 0
            lo, hi = ordered[n_bot], ordered[n - n_top - 1]
        else:
            lo, hi = ordered[n - max(keep, 1)], ordered[-1]
        magnitude = delta.abs()
        at_cut = (magnitude == lo) | (magnitude == hi)
        ambiguous |= at_cut
        if rescale:
            kept_l1 = magnitude[(magnitude >= lo) & (magnitude <= hi)].sum()
            term = term * (magnitude.sum() / kept_l1 if kept_l1 > 0 else 1.0)
        kept_terms.append(torch.where((magnitude > lo) & (magnitude < hi), term, 0.0))
        cut_terms.append(torch.where(at_cut, term.abs(), 0.0))
    if spec.consensus:
        kept = torch.stack(kept_terms)
        undecided = torch.stack(cut_terms).sum(0) if cut_terms else torch.zeros(shape)
        ambiguous |= kept.sum(0).abs() <= undecided + 2.0 ** -6 * kept.abs().sum(0)
    return ambiguous
