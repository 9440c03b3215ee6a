"""Fitness on adaptive subsets: every candidate of a generation is scored on one shared,
fresh random subset of the search items, whose size follows how noisy the ranking is.

Items. The search tasks' documents are pooled and put in one random order per
generation, fixed by the run's seed and the generation (RacePlan.order, as racing's):
a generation's subset is the first n items of its order, so every candidate scores the
same items (their comparison is paired) and every generation sees new ones.

The estimate. With N documents in all, N_t of them task t's, the weighted score is the
pool mean of c = (N / N_t) Σ_{s scores t} w_s m_s (search/racing.py), so a candidate's
estimate is the mean of c over its n items, unbiased for its full score, with standard
error sd(c) / sqrt(n) · sqrt(1 - n/N) (sampling without replacement).

The size: UH-CMA-ES (Hansen, Niederberger, Guzzella, Koumoutsakos, "A method for handling
uncertainty in evolutionary optimization...", IEEE TEC 2009), through pycma's own
`cma.NoiseHandler` measure. After the generation is scored on its subset, its first
`reevaluations` candidates (pycma's 2 + λ/20, rounded down; candidates are independent
samples, so the first are a random choice) are scored again on the next n items of the
order, a disjoint subset. The noise measure s is UH-CMA-ES's rank-change statistic: how
far each re-scored candidate's rank moves between the two scorings, against the move a
random ranking would make (the θ-percentile limits), smoothed over generations. When s
> 0 the ranking is noisy and the next generation's subset grows by `growth`; otherwise it
shrinks by growth^(-1/4), always between `minimum` and `maximum` of the pool and in whole
forward batches. CMA-ES is told each candidate's estimate on the shared subset (the
re-scoring only measures noise, as in UH-CMA-ES), and its σ is left alone: only the
evaluation effort adapts.

The size starts small (2% of the pool, at least one forward batch), as UH-CMA-ES starts
from one evaluation: on the toy's 2,000-item pool a generation at one batch of 64 items
costs 28× less than at the full pool, and the noise measure grows it only when the
ranking needs more.

The history marks every estimate `"fitness": "subset"` with `items` (documents scored)
and `span` (its items: positions start..stop of the generation's pool order), and the
re-scored candidates' second estimate as `reevaluation`. A candidate's estimate is never
the best: CMA-ES's mean is scored as often as `full_share` of the documents allows, on
`mean_items` of the pool, the first items of one fixed order (the same items every time;
its record's `span` is in that order, marked `"order": "mean"`), and best_config.yaml is
the best of the means (search/coordinator.py, _score_mean).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import cma

from hotmerge.search.racing import RacePlan


def reevaluations(popsize: int) -> int:
    """How many candidates a generation scores twice: pycma's NoiseHandler default."""
    return max(1, min(popsize, int(2 + popsize / 20)))


class SubsetSize:
    """The size of the next generation's subset, adapted by UH-CMA-ES's noise measure."""

    def __init__(self, plan: RacePlan, config, genes: int, items: float | None = None, noise: float = 0.0):
        """`config`: config.evolve.SubsetsConfig; `items` and `noise`: the state a resumed
        run saved (default: the configured start, no noise yet)."""
        self.plan = plan
        self.minimum = config.minimum * plan.total
        self.maximum = config.maximum * plan.total
        self.handler = cma.NoiseHandler(genes, maxevals=[self.minimum, self.maximum])
        self.handler.alphaevals = config.growth
        self.handler.alphaevalsdown = config.growth ** -0.25
        self.handler.evaluations = config.start * plan.total if items is None else items
        self.handler.noiseS = noise

    @property
    def items(self) -> int:
        """Items each candidate scores in the next generation: whole batches, and at most half
        the pool (the re-scoring needs a disjoint subset as large)."""
        return min(self.plan.whole_batches(self.handler.evaluations), self.plan.total // 2)

    @property
    def state(self) -> dict:
        return {"items": float(self.handler.evaluations), "noise": float(self.handler.noiseS)}

    def update(self, told: list[float], again: dict[int, float]) -> float:
        """Take a generation's estimates (higher is better) and the second estimates of the
        re-scored candidates; adapt the size. Returns the noise measure."""
        fit = [-t for t in told]  # pycma ranks costs
        handler = self.handler
        handler.fit = list(fit)
        handler.fitre = list(fit)
        for index, value in again.items():
            handler.fitre[index] = -value
        handler.idx = np.asarray(sorted(again), dtype=int)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handler.update_measure()
        handler.treat()  # grows or shrinks handler.evaluations; σ's factor is not used
        return float(handler.noiseS)


def subset_estimate(plan: RacePlan, specs: list[tuple[str, float]], generation: int, start: int, stop: int,
                    values: dict[int, list[float]]) -> tuple[float, float]:
    """(estimate of the weighted score, its standard error) from the per-item values of the
    items start..stop (module docstring)."""
    c = plan.pool_values(specs, generation, start, stop, values)
    n = len(c)
    stderr = float(np.std(c, ddof=1)) / math.sqrt(n) * math.sqrt(1.0 - n / plan.total) if n > 1 else float("nan")
    return float(np.mean(c)), stderr
