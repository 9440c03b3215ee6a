"""CMA-ES (pycma) with an explicit seed, whose state is the values it was told.

pycma draws candidates from numpy's global random generator, so the generator's
state is kept beside the strategy and swapped in around every `ask`: the search
is then reproducible from its seed whatever else in the process uses numpy.

No state is ever unpickled. A run directory keeps how the search started (x0, σ0,
seed, population) and, per generation, the values CMA-ES was told; `replay` rebuilds
the strategy by asking and telling those generations again. Asking is deterministic
from the seed and the values told, so the rebuilt strategy is the one the run had:
the same σ, covariance and next samples. Each replayed generation's candidates are
checked against the ones the run recorded, so a state that does not belong to its
history is refused instead of steering a search somewhere else.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

import numpy as np

from hotmerge.errors import ConfigError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pycma warns when matplotlib is absent; plots are not used
    import cma

# CMA-ES is rank-based: any cost worse than every real one marks a failed candidate.
FAILED_COST = 1e9
FAILED_TOLD = -FAILED_COST  # the same, in the score's units (higher is better)
# A replayed candidate may differ from the recorded one by floating-point noise (another
# machine's BLAS in pycma's eigendecomposition); anything larger is another search.
REPLAY_RTOL, REPLAY_ATOL = 1e-7, 1e-10


def told_values(scores: list[float | None]) -> list[float]:
    """What CMA-ES is told for plain scores, in the score's units: a failure is worst."""
    return [FAILED_TOLD if s is None else float(s) for s in scores]


class Search:
    """Minimises cost = -told."""

    def __init__(self, x0: np.ndarray, sigma0: float, seed: int, max_fevals: int,
                 popsize: int | None = None, timeout: float | None = None):
        # pycma treats seed 0 as "seed from the clock"; shift so every user seed is fixed.
        options = {"seed": seed + 1, "maxfevals": max_fevals, "verbose": -9}
        if popsize is not None:
            options["popsize"] = popsize
        saved = np.random.get_state()
        np.random.seed(seed + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.strategy = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=float), sigma0, options)
        self.rng_state = np.random.get_state()
        np.random.set_state(saved)
        self.start = {"x0": np.asarray(x0, dtype=float).tolist(), "sigma0": float(sigma0), "seed": int(seed),
                      "popsize": int(self.strategy.popsize)}
        self.generation = 0
        # --timeout: seconds between ask and tell, summed over generations (pycma's own
        # timer would restart at every resume, so hotmerge keeps the sum with the state).
        self.timeout = timeout
        self.elapsed = 0.0
        self._asked_at: float | None = None
        self.subset_state: dict | None = None  # with subsets: the size after the last told generation

    @classmethod
    def from_start(cls, start: dict, max_fevals: int, timeout: float | None = None) -> "Search":
        """The search a run directory's state file started (RunDir.read_search)."""
        return cls(np.asarray(start["x0"], dtype=float), start["sigma0"], start["seed"], max_fevals,
                   start["popsize"], timeout)

    @property
    def popsize(self) -> int:
        return self.strategy.popsize

    @property
    def mu(self) -> int:
        """How many of a generation's best candidates the update uses (pycma's μ)."""
        return int(self.strategy.sp.weights.mu)

    @property
    def xfavorite(self) -> np.ndarray:
        """CMA-ES's own estimate of the optimum: the mean of its distribution."""
        return np.asarray(self.strategy.result.xfavorite, dtype=float)

    def done(self, evaluations: int, max_fevals: int) -> bool:
        if evaluations >= max_fevals:
            return True
        if self.timeout is not None and self.elapsed > self.timeout:
            return True
        stop = {k: v for k, v in self.strategy.stop().items() if k not in ("maxfevals", "timeout")}
        return bool(stop)

    def _with_own_rng(self, call):
        saved = np.random.get_state()
        np.random.set_state(self.rng_state)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return call()
        finally:
            self.rng_state = np.random.get_state()
            np.random.set_state(saved)

    def ask(self) -> list[np.ndarray]:
        self._asked_at = time.monotonic()
        candidates = self._with_own_rng(self.strategy.ask)
        return [np.asarray(x, dtype=float) for x in candidates]

    def tell(self, candidates: list[np.ndarray], told: list[float]) -> None:
        """Tell one generation; `told` in the score's units (higher is better)."""
        costs = [-float(t) for t in told]
        self._with_own_rng(lambda: self.strategy.tell(candidates, costs))
        if self._asked_at is not None:
            self.elapsed += time.monotonic() - self._asked_at
            self._asked_at = None
        self.generation += 1

    def replay(self, generations: list[dict], recorded: Callable[[int], list | None], where: str = "the state") -> None:
        """Ask and tell the generations a run told (RunDir.read_search's lines), checking
        each generation's candidates against `recorded(generation)`: the genotypes the run's
        history holds for it (None when it holds none)."""
        for line in generations:
            generation = self.generation
            if line["generation"] != generation:
                raise ConfigError(f"{where} skips from generation {generation} to {line['generation']}: "
                                  "it was changed; restore it or pick a new --storage-path")
            candidates = self.ask()
            expected = recorded(generation)
            if expected is None or len(expected) != len(candidates) or not all(
                    np.allclose(a, b, rtol=REPLAY_RTOL, atol=REPLAY_ATOL) for a, b in zip(candidates, expected)):
                raise ConfigError(
                    f"{where} does not reproduce generation {generation} of the history: the run directory "
                    "was changed or belongs to another search; restore it or pick a new --storage-path")
            if len(line["told"]) != len(candidates):
                raise ConfigError(f"{where} tells generation {generation} {len(line['told'])} values for "
                                  f"{len(candidates)} candidates: restore it or pick a new --storage-path")
            self.tell(candidates, line["told"])
            self.elapsed = line["seconds"]
            self.subset_state = line.get("subsets")
