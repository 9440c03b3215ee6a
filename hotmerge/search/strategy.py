"""CMA-ES (pycma) with an explicit seed and a state that can be saved between generations.

pycma draws candidates from numpy's global random generator, so the generator's
state is kept beside the strategy and swapped in around every `ask`: the search
is then reproducible from its seed whatever else in the process uses numpy, and
a resumed run asks for exactly the candidates the killed run would have.
"""

from __future__ import annotations

import io
import pickle
import warnings
from dataclasses import dataclass

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pycma warns when matplotlib is absent; plots are not used
    import cma

# CMA-ES is rank-based: any cost worse than every real one marks a failed candidate.
FAILED_COST = 1e9


def dump_state(state: "SearchState") -> bytes:
    """Pickle a search state, keeping pycma's references to np.random.randn by name.

    pycma stores the global generator's bound `randn` in its options and sampler; plain
    pickle would copy that generator by value, and a loaded strategy would then draw
    from the frozen copy instead of the generator state this module manages.
    """
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer)
    pickler.persistent_id = lambda obj: "np.random.randn" if obj is np.random.randn else None
    pickler.dump(state)
    return buffer.getvalue()


def load_state(data: bytes) -> "SearchState":
    unpickler = pickle.Unpickler(io.BytesIO(data))
    unpickler.persistent_load = lambda pid: np.random.randn
    return unpickler.load()


@dataclass
class SearchState:
    strategy: cma.CMAEvolutionStrategy
    rng_state: tuple
    generation: int = 0


class Search:
    """Minimises cost = -score."""

    def __init__(self, x0: np.ndarray, sigma0: float, seed: int, max_fevals: int,
                 popsize: int | None = None, timeout: float | None = None):
        # pycma treats seed 0 as "seed from the clock"; shift so every user seed is fixed.
        options = {"seed": seed + 1, "maxfevals": max_fevals, "verbose": -9}
        if popsize is not None:
            options["popsize"] = popsize
        if timeout is not None:
            options["timeout"] = timeout
        saved = np.random.get_state()
        np.random.seed(seed + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=float), sigma0, options)
        self.state = SearchState(strategy, np.random.get_state())
        np.random.set_state(saved)

    @classmethod
    def from_state(cls, state: SearchState) -> "Search":
        search = cls.__new__(cls)
        search.state = state
        return search

    @property
    def popsize(self) -> int:
        return self.state.strategy.popsize

    @property
    def mu(self) -> int:
        """How many of a generation's best candidates the update uses (pycma's μ)."""
        return int(self.state.strategy.sp.weights.mu)

    @property
    def xfavorite(self) -> np.ndarray:
        """CMA-ES's own estimate of the optimum: the mean of its distribution."""
        return np.asarray(self.state.strategy.result.xfavorite, dtype=float)

    @property
    def generation(self) -> int:
        return self.state.generation

    def done(self, evaluations: int, max_fevals: int) -> bool:
        if evaluations >= max_fevals:
            return True
        stop = {k: v for k, v in self.state.strategy.stop().items() if k != "maxfevals"}
        return bool(stop)

    def _with_own_rng(self, call):
        saved = np.random.get_state()
        np.random.set_state(self.state.rng_state)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return call()
        finally:
            self.state.rng_state = np.random.get_state()
            np.random.set_state(saved)

    def ask(self) -> list[np.ndarray]:
        candidates = self._with_own_rng(self.state.strategy.ask)
        return [np.asarray(x, dtype=float) for x in candidates]

    def tell(self, candidates: list[np.ndarray], scores: list[float | None]) -> None:
        costs = [FAILED_COST if s is None else -float(s) for s in scores]
        self._with_own_rng(lambda: self.state.strategy.tell(candidates, costs))
        self.state.generation += 1
