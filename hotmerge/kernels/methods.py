"""The merge-method registry: every fact about a method, written once.

Each entry says what mergekit 0.1.5's registry says of the method (its per-model
and global parameters with their defaults, its sparsification and consensus, its
paper), what mergekit-evolve searches for it (the genes and the genome's normalize
default), and what hotmerge must keep resident for it (load-time statistics and
the bytes per parameter the memory plan counts). Config validation, the genome,
merge-config reading, the memory plan, both runtimes, the kernels and the
benchmarks all read this table; adding a method means one entry here and its
branch in the kernels (reference.merge_tensor is the definition).

tests/test_methods.py holds this table equal to `mergekit.merge_methods.get(name)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional, Union


class Sparsification(str, Enum):
    """mergekit.sparsify.SparsificationMethod, plus `none` for methods without one."""

    none = "none"
    magnitude = "magnitude"  # TIES: keep the top-k |delta| of each tensor
    random = "random"  # DARE: Bernoulli(density) keep mask
    magnitude_outliers = "magnitude_outliers"  # breadcrumbs: drop the smallest and the top gamma
    della_magprune = "della_magprune"  # DELLA: keep probability linear in the row rank


# How the kernels keep deltas, by sparsification (ints: they travel to C and Triton).
SPARSE_NONE = 0  # keep every delta
SPARSE_RANGE = 1  # keep |delta| keys in (lo, hi), a share of lo and hi (ties, breadcrumbs)
SPARSE_RANDOM = 2  # keep with probability density (dare)
SPARSE_RANKED = 3  # keep with a probability linear in the row rank of |delta| (della)
_SPARSE_MODE = {
    Sparsification.none: SPARSE_NONE,
    Sparsification.magnitude: SPARSE_RANGE,
    Sparsification.magnitude_outliers: SPARSE_RANGE,
    Sparsification.random: SPARSE_RANDOM,
    Sparsification.della_magprune: SPARSE_RANKED,
}

# mergekit's defaults for the per-model scalars of the outlier and della pruners
DEFAULT_GAMMA = 0.01
DEFAULT_EPSILON = 0.15

Value = Union[float, bool]
REQUIRED = None  # a parameter without a default must be given


@dataclass(frozen=True)
class Param:
    """One mergekit parameter: its name and default (REQUIRED: none)."""

    name: str
    default: Optional[Value] = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MethodSpec:
    name: str
    pretty_name: str
    paper: str
    combine: bool  # linear / slerp: a weighted sum of the sources, no base, no delta
    sparsification: Sparsification
    consensus: bool  # TIES 'sum' sign consensus
    tensor_params: tuple  # Param per model (mergekit's tensor_parameters())
    global_params: tuple  # Param for the whole merge (mergekit's parameters())
    genes: tuple  # what mergekit-evolve searches per (layer group, model, filter set)
    evolve_normalize: bool  # the genome's normalize when genome.normalize is unset
    evolve_native: bool  # one of mergekit-evolve's own five methods

    def _default(self, name: str) -> Value:
        return next(p.default for p in self.global_params if p.name == name)

    @property
    def default_normalize(self) -> bool:
        """mergekit's normalize default for a merge config (slerp has none: False)."""
        return bool(self._default("normalize")) if self.takes("normalize") else False

    @property
    def default_rescale(self) -> bool:
        return bool(self._default("rescale")) if self.takes("rescale") else False

    @property
    def needs_base(self) -> bool:
        return not self.combine

    @property
    def sparsify(self) -> Optional[str]:
        """mergekit's SparsificationMethod name, None without one."""
        return None if self.sparsification is Sparsification.none else self.sparsification.value

    @property
    def sparse_mode(self) -> int:
        return _SPARSE_MODE[self.sparsification]

    @property
    def params(self) -> tuple:
        """Per-model parameter names, in the kernels' [rows, M, P] order."""
        return tuple(p.name for p in self.tensor_params)

    def takes(self, name: str) -> bool:
        return any(p.name == name for p in self.tensor_params + self.global_params)

    # -- what stays resident ------------------------------------------------

    @property
    def needs_histograms(self) -> bool:
        """Per-(model, tensor) |delta| histograms: magnitude cuts (ties, breadcrumbs)."""
        return self.sparse_mode == SPARSE_RANGE

    @property
    def needs_rank_codes(self) -> bool:
        """Per-element 8-bit row ranks of |delta| (della)."""
        return self.sparse_mode == SPARSE_RANKED

    @property
    def needs_slerp_constants(self) -> bool:
        return self.name == "slerp"

    @property
    def rank_code_bytes_per_parameter(self) -> int:
        """Resident bytes per parameter per source model beyond the sources themselves."""
        return 1 if self.needs_rank_codes else 0

    @property
    def tensor_parallel_exact(self) -> bool:
        """Merges shard by shard exactly: no statistic over a whole tensor."""
        return self.sparsification is Sparsification.none and self.name != "slerp"


_LINEAR_GLOBALS = (Param("normalize", True),)


def _gta(name, pretty, paper, sparsification, consensus, normalize, rescale, *,
         evolve_normalize, evolve_native=False) -> MethodSpec:
    tensor = [Param("weight"), Param("density", 1.0)]
    if sparsification is Sparsification.magnitude_outliers:
        tensor.append(Param("gamma", DEFAULT_GAMMA))
    if sparsification is Sparsification.della_magprune:
        tensor.append(Param("epsilon", DEFAULT_EPSILON))
    return MethodSpec(
        name=name, pretty_name=pretty, paper=paper, combine=False,
        sparsification=sparsification, consensus=consensus,
        tensor_params=tuple(tensor),
        global_params=(Param("int8_mask", False), Param("normalize", normalize),
                       Param("rescale", rescale), Param("lambda", 1.0)),
        genes=("weight",) if sparsification is Sparsification.none else ("weight", "density"),
        evolve_normalize=evolve_normalize, evolve_native=evolve_native,
    )


S = Sparsification
_ALL = (
    MethodSpec("linear", "Linear", "https://arxiv.org/abs/2203.05482", True, S.none, False,
               (Param("weight"),), _LINEAR_GLOBALS, ("weight",),
               evolve_normalize=True, evolve_native=True),
    MethodSpec("slerp", "SLERP", "https://en.wikipedia.org/wiki/Slerp", True, S.none, False,
               (), (Param("t"),), ("t",), evolve_normalize=False, evolve_native=True),
    _gta("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
         S.none, False, False, False, evolve_normalize=False, evolve_native=True),
    _gta("ties", "TIES", "https://arxiv.org/abs/2306.01708",
         S.magnitude, True, True, False, evolve_normalize=True, evolve_native=True),
    _gta("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099",
         S.random, True, False, True, evolve_normalize=True, evolve_native=True),
    # Beyond mergekit-evolve's five: the genome's normalize follows the same rule by
    # kind, on where TIES sign consensus is used.
    _gta("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099",
         S.random, False, False, True, evolve_normalize=False),
    _gta("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
         S.magnitude_outliers, False, False, False, evolve_normalize=False),
    _gta("breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795",
         S.magnitude_outliers, True, False, False, evolve_normalize=True),
    _gta("della", "DELLA", "https://arxiv.org/abs/2406.11617",
         S.della_magprune, True, True, True, evolve_normalize=True),
    _gta("della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617",
         S.della_magprune, False, False, True, evolve_normalize=False),
)
del S


def _registry(methods) -> dict:
    out: dict = {}
    for m in methods:
        if m.name in out:
            raise ValueError(f"merge method {m.name} is registered twice")
        out[m.name] = m
    return out


METHODS: dict = _registry(_ALL)
METHOD_NAMES: tuple = tuple(METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}: use one of {', '.join(METHOD_NAMES)}") from None
