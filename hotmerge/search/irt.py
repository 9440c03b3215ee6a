"""IRT anchor fitness: estimate a candidate's score on the whole search pool from a few
anchor items, with an item response model fitted to candidates scored in full.

The references are tinyBenchmarks (Polo et al., ICML 2024), which estimates benchmarks
of thousands of items from about 100 anchors, and MERGE³ (ICML 2025), which uses the
same estimate as the fitness of an evolutionary merge search.

Calibration. Every item of the pool is scored by the candidates of the first
`calibration_generations` generations and, every `recalibrate_every` generations after
that, by a whole generation again (those generations are plain full evaluations, told
their full scores). Each calibrated candidate is one row of per-item values y_ri in
[0, 1] (the pool in its canonical order: task by task, documents in order).

The model: a two-parameter logistic IRT, P(y_ri = 1) = σ(a_i (θ_r - b_i)), with one
ability θ_r per calibrated candidate and a discrimination a_i > 0 and difficulty b_i per
item, fitted jointly by maximum a posteriori (priors θ ~ N(0, 1), b ~ N(0, 2²),
log a ~ N(0, 0.5²), which keep items every candidate gets right or wrong finite) with
L-BFGS in float64 from a fixed start: the same rows give the same items on every run.

Anchors. The items' IRT embeddings (a_i, a_i b_i) are clustered with k-means into
`anchors` clusters (k-means++ seeded from the run's seed); each cluster's anchor is its
item nearest the centre. The fitted model and the anchors are kept in irt.json.

The estimate (tinyBenchmarks' p-IRT). A later candidate scores the anchors only. Its
ability is the MAP θ from its anchor values (Newton's method on a concave posterior);
each other item is predicted as p_i = σ(a_i (θ - b_i)), and the estimate is the pool
mean of c_i (search/racing.py: c = (N / N_t) w_t m) over the anchors' values and the
other items' predictions. Its standard error combines the unseen items' Bernoulli
variance, Σ c_i² p_i (1 - p_i) / N² (c at m = 1), with θ's posterior variance carried by
the derivative of the estimate in θ. It does not include the item parameters' own
uncertainty, nor misfit of the model: the calibration generations record the estimate
beside the full score (`irt_estimate`) and held-out re-scoring shows the rest, so the
bias is measured, not assumed away.

One metric per task: IRT needs one value per item, so a task may appear once in the
search tasks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

PRIOR_B_SD = 2.0
PRIOR_LOG_A_SD = 0.5


@dataclass
class ItemModel:
    """Fitted item parameters over the pool (canonical order) and the chosen anchors."""

    a: np.ndarray  # discrimination per item
    b: np.ndarray  # difficulty per item
    anchors: np.ndarray  # pool indices of the anchor items, increasing

    def to_json(self) -> str:
        return json.dumps({"a": self.a.tolist(), "b": self.b.tolist(), "anchors": self.anchors.tolist()})

    @classmethod
    def from_json(cls, text: str, pool: int) -> "ItemModel":
        """The model as irt.json keeps it; ValueError when it is not one for this pool."""
        data = json.loads(text)
        a, b = np.asarray(data["a"], dtype=float), np.asarray(data["b"], dtype=float)
        anchors = np.asarray(data["anchors"], dtype=int)
        if a.shape != (pool,) or b.shape != (pool,) or not (np.isfinite(a).all() and np.isfinite(b).all()) \
                or (a <= 0).any() or anchors.ndim != 1 or not len(anchors) or anchors.min() < 0 \
                or anchors.max() >= pool or len(set(anchors.tolist())) != len(anchors):
            raise ValueError("not an item model of this pool")
        return cls(a, b, np.sort(anchors))


def fit_items(responses: np.ndarray, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, θ) fitted to `responses` (rows: calibrated candidates; columns: items; values
    in [0, 1]) by joint MAP (module docstring)."""
    import torch

    y = torch.as_tensor(np.asarray(responses, dtype=float), dtype=torch.float64)
    rows, items = y.shape
    # Start: abilities from the rows' means, difficulties from the items' means.
    theta = torch.as_tensor(_logit(y.mean(dim=1).numpy()) - _logit(float(y.mean())), dtype=torch.float64)
    b = torch.as_tensor(-_logit(y.mean(dim=0).numpy()), dtype=torch.float64)
    theta = (theta - theta.mean()).clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    log_a = torch.zeros(items, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([theta, b, log_a], max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def loss():
        optimiser.zero_grad()
        logits = torch.exp(log_a)[None, :] * (theta[:, None] - b[None, :])
        likelihood = -torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        prior = (theta ** 2).sum() / 2 + (b ** 2).sum() / (2 * PRIOR_B_SD ** 2) \
            + (log_a ** 2).sum() / (2 * PRIOR_LOG_A_SD ** 2)
        value = -(likelihood - prior) / (rows * items)
        value.backward()
        return value

    optimiser.step(loss)
    return (torch.exp(log_a).detach().numpy(), b.detach().numpy(), theta.detach().numpy())


def choose_anchors(a: np.ndarray, b: np.ndarray, count: int, seed: int, iterations: int = 50) -> np.ndarray:
    """Pool indices of `count` anchors: k-means on the items' embeddings (a, a·b), each
    cluster's item nearest its centre (module docstring)."""
    points = np.stack([a, a * b], axis=1)
    points = (points - points.mean(axis=0)) / np.maximum(points.std(axis=0), 1e-12)
    count = min(count, len(points))
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(len(points))]]
    for _ in range(count - 1):  # k-means++
        distance = np.min([((points - c) ** 2).sum(axis=1) for c in centres], axis=0)
        total = distance.sum()
        pick = rng.choice(len(points), p=distance / total) if total > 0 else rng.integers(len(points))
        centres.append(points[pick])
    centres = np.array(centres)
    for _ in range(iterations):
        label = ((points[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
        moved = np.array([points[label == k].mean(axis=0) if (label == k).any() else centres[k]
                          for k in range(count)])
        if np.allclose(moved, centres):
            break
        centres = moved
    anchors = set()
    for centre in centres:
        order = np.argsort(((points - centre) ** 2).sum(axis=1), kind="stable")
        anchors.add(int(next(i for i in order if int(i) not in anchors)))
    return np.array(sorted(anchors), dtype=int)


def ability(model: ItemModel, values: np.ndarray, steps: int = 50) -> tuple[float, float]:
    """(MAP θ, its posterior variance) from the anchors' values (prior N(0, 1))."""
    a, b = model.a[model.anchors], model.b[model.anchors]
    theta = 0.0
    for _ in range(steps):
        p = _sigmoid(a * (theta - b))
        gradient = float((a * (values - p)).sum()) - theta
        curvature = float((a ** 2 * p * (1 - p)).sum()) + 1.0
        step = gradient / curvature
        theta += step
        if abs(step) < 1e-12:
            break
    p = _sigmoid(a * (theta - b))
    return theta, 1.0 / (float((a ** 2 * p * (1 - p)).sum()) + 1.0)


def estimate(model: ItemModel, scale: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(estimated pool score, its standard error) from the anchors' values; `scale`: each
    item's c at m = 1, (N / N_t) w_t (module docstring)."""
    theta, variance = ability(model, np.asarray(values, dtype=float))
    unseen = np.ones(len(scale), dtype=bool)
    unseen[model.anchors] = False
    p = _sigmoid(model.a[unseen] * (theta - model.b[unseen]))
    n = len(scale)
    score = (float((scale[model.anchors] * values).sum()) + float((scale[unseen] * p).sum())) / n
    slope = float((scale[unseen] * model.a[unseen] * p * (1 - p)).sum()) / n
    noise = float((scale[unseen] ** 2 * p * (1 - p)).sum()) / n ** 2
    return score, math.sqrt(noise + slope ** 2 * variance)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p, eps: float = 0.02):
    p = np.clip(p, eps, 1 - eps)
    return np.log(p / (1 - p))
