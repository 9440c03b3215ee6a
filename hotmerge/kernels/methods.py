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

Value = Union[float, bool, int]
REQUIRED = None  # a parameter without a default must be given

# mergekit's ParameterScope: one value per merge (per tensor), per non-base input, per input.
SHARED, NON_BASE, INPUT = "shared", "non_base", "input"


@dataclass(frozen=True)
class Param:
    """One mergekit parameter: its name, default (REQUIRED: none) and scope.

    optional: the parameter may be left unset (mergekit's Optional[float] = None,
    passthrough's scale); its default is then None without being required.
    x0: where evolve starts this gene when it has no default (mergekit-evolve's
    weight: 1/M, set by the genome)."""

    name: str
    default: Optional[Value] = REQUIRED
    scope: str = SHARED
    optional: bool = False
    x0: Optional[float] = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED and not self.optional


# mergekit's BasePolicy, as far as hotmerge reads it
BASE_REQUIRED, BASE_OPTIONAL, BASE_IGNORED = "required", "optional", "ignored"


@dataclass(frozen=True)
class Contract:
    """mergekit's InputContract: the base policy and how many inputs a tensor takes."""

    base: str = BASE_IGNORED
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    min_non_base: Optional[int] = None
    max_non_base: Optional[int] = None

    def non_base_range(self, with_base: bool) -> tuple[int, Optional[int]]:
        """(fewest, most) inputs besides the base a tensor or slice takes, the base counted
        among the inputs where the method takes one; most None: no limit."""
        fewest = (self.min_non_base if with_base else None) or max(1, self.min_inputs - int(with_base))
        most = self.max_non_base if with_base and self.max_non_base is not None else (
            None if self.max_inputs is None else self.max_inputs - int(with_base))
        return fewest, most


BASE_CONTRACT = Contract(base=BASE_REQUIRED)


# How the engine applies a method (MethodSpec.engine):
#   "combine"  sum of coef * source (linear, slerp; the table holds the coefficients)
#   "task"     base + sum of w * kept delta (the task-arithmetic family)
#   "stats"    a linear combination whose coefficients come from load-time statistics of
#              each tensor (norms and dot products): the table turns them into combine or
#              task coefficients, so the fused kernels need no branch of their own
#   "nearswap" an elementwise branch of its own
#   "sce"      SCE's branch: a cut of the variance across the deltas, TIES' sign election
#              and per-model weights from the selected deltas
#   "ram"      RAM and RAM+'s branch: each element counts the models whose delta exceeds
#              epsilon (ramplus_tl's per-model lambda from counts taken at load)
#   "fusion"   arcee_fusion: a keep code per element, computed at load (nothing in it
#              depends on a candidate), applied by the task kernels' ranked-mask branch
#   None       registered (mergekit has it) but not applied by hotmerge: `refusal` says why


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
    contract: Contract = BASE_CONTRACT
    engine: Optional[str] = "task"
    refusal: str = ""  # engine None: what hotmerge cannot reproduce, for the one-line refusal
    # what a statistic that depends on the candidate costs per apply ("" when none does)
    candidate_statistics: str = ""

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
        """A base model must be given (slerp takes its base among its two sources)."""
        return self.contract.base == BASE_REQUIRED and not self.combine

    @property
    def takes_base(self) -> bool:
        """The base, when given, enters the merge as the base (not as one more source)."""
        return self.contract.base in (BASE_REQUIRED, BASE_OPTIONAL) and not self.combine

    @property
    def supported(self) -> bool:
        return self.engine is not None

    def refuse_unless_supported(self) -> None:
        """Raise ValueError in one line when hotmerge cannot apply this method exactly."""
        if not self.supported:
            raise ValueError(f"merge method {self.name} is not supported: {self.refusal}")

    @property
    def searchable(self) -> bool:
        """evolve has at least one gene to move."""
        return bool(self.genes)

    def gene_param(self, name: str) -> Param:
        return next(p for p in self.tensor_params + self.global_params if p.name == name)

    @property
    def gene_scope(self) -> str:
        """NON_BASE: one gene per (layer group, model, filter set); SHARED: per (layer group, filter set)."""
        if self.name == "slerp":
            return NON_BASE  # mergekit-evolve: a gene per model, the top two pick the pair and t
        return NON_BASE if all(self._scope(g) != SHARED for g in self.genes) else SHARED

    def _scope(self, name: str) -> str:
        return next(p.scope for p in self.tensor_params + self.global_params if p.name == name)

    @property
    def sparsify(self) -> Optional[str]:
        """mergekit's SparsificationMethod name, None without one."""
        return None if self.sparsification is Sparsification.none else self.sparsification.value

    @property
    def sparse_mode(self) -> int:
        if self.engine == "fusion":
            return SPARSE_RANKED  # its keep codes ride the ranked mask: keep iff u24 < 2^24 * code
        return _SPARSE_MODE[self.sparsification]

    @property
    def functional(self) -> bool:
        """One of mergekit's functional methods (not linear, slerp or the task-arithmetic family):
        shared parameters travel as per-model columns, `active` marks each tensor's inputs."""
        return self.engine not in ("task", "combine", None)

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
        return self.sparsification is Sparsification.della_magprune

    @property
    def needs_slerp_constants(self) -> bool:
        """Per-segment norms and dot products (slerp, and every "stats" method)."""
        return self.name == "slerp" or self.engine == "stats"

    @property
    def rank_code_bytes_per_parameter(self) -> int:
        """Resident bytes per parameter per source model beyond the sources themselves
        (della's rank codes, arcee_fusion's keep codes)."""
        return 1 if self.needs_rank_codes or self.engine == "fusion" else 0


_LINEAR_GLOBALS = (Param("normalize", True),)


def _gta(name, pretty, paper, sparsification, consensus, normalize, rescale, *,
         evolve_normalize, evolve_native=False) -> MethodSpec:
    tensor = [Param("weight", scope=NON_BASE), Param("density", 1.0, NON_BASE)]
    if sparsification is Sparsification.magnitude_outliers:
        tensor.append(Param("gamma", DEFAULT_GAMMA, NON_BASE))
    if sparsification is Sparsification.della_magprune:
        tensor.append(Param("epsilon", DEFAULT_EPSILON, NON_BASE))
    return MethodSpec(
        name=name, pretty_name=pretty, paper=paper, combine=False,
        sparsification=sparsification, consensus=consensus,
        tensor_params=tuple(tensor),
        global_params=(Param("int8_mask", False), Param("normalize", normalize),
                       Param("rescale", rescale), Param("lambda", 1.0)),
        genes=("weight",) if sparsification is Sparsification.none else ("weight", "density"),
        evolve_normalize=evolve_normalize, evolve_native=evolve_native,
    )


def _own(name, pretty, paper, *, tensor=(), shared=(), genes=(), contract, engine,
         combine=False, refusal="", candidate_statistics="") -> MethodSpec:
    """A method outside the task-arithmetic family (mergekit's functional methods)."""
    return MethodSpec(
        name=name, pretty_name=pretty, paper=paper, combine=combine,
        sparsification=Sparsification.none, consensus=False,
        tensor_params=tuple(tensor), global_params=tuple(shared), genes=tuple(genes),
        evolve_normalize=False, evolve_native=False, contract=contract, engine=engine,
        refusal=refusal, candidate_statistics=candidate_statistics,
    )


S = Sparsification
_ALL = (
    MethodSpec("linear", "Linear", "https://arxiv.org/abs/2203.05482", True, S.none, False,
               (Param("weight", scope=INPUT),), _LINEAR_GLOBALS, ("weight",),
               evolve_normalize=True, evolve_native=True, contract=Contract(), engine="combine"),
    MethodSpec("slerp", "SLERP", "https://en.wikipedia.org/wiki/Slerp", True, S.none, False,
               (), (Param("t"),), ("t",), evolve_normalize=False, evolve_native=True,
               contract=Contract(base=BASE_REQUIRED, min_inputs=2, max_inputs=2), engine="combine"),
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
    # mergekit's functional methods. A "stats" method is a linear combination of the
    # sources (or of the deltas, with a base) whose coefficients come from each tensor's
    # norms and dot products, computed once at load.
    _own("model_stock", "Model Stock", "https://arxiv.org/abs/2403.19522",
         shared=(Param("filter_wise", False),),
         contract=Contract(base=BASE_REQUIRED, min_inputs=3), engine="stats"),
    _own("nuslerp", "NuSLERP", "",
         tensor=(Param("weight", scope=NON_BASE),),
         shared=(Param("nuslerp_row_wise", False), Param("nuslerp_flatten", True)),
         genes=("weight",),
         contract=Contract(base=BASE_OPTIONAL, min_non_base=2, max_non_base=2), engine="stats"),
    _own("multislerp", "Multi-SLERP", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
         tensor=(Param("weight", scope=NON_BASE),),
         shared=(Param("normalize_weights", True), Param("eps", 1e-8)),
         genes=("weight",),
         contract=Contract(base=BASE_OPTIONAL, min_non_base=1), engine="stats",
         candidate_statistics="none per element: the weights enter an O(M^2) solve per tensor "
                              "on the host from the load-time dot products"),
    _own("karcher", "Karcher Mean", "https://arxiv.org/abs/2603.04972",
         shared=(Param("max_iter", 10), Param("tol", 1e-5)),
         contract=Contract(), engine="stats", combine=True),
    _own("sce", "SCE", "https://arxiv.org/abs/2408.07990",
         shared=(Param("int8_mask", False), Param("select_topk", 1.0)),
         genes=("select_topk",), contract=BASE_CONTRACT, engine="sce",
         candidate_statistics="none per element: the per-model weights come from a load-time "
                              "histogram of the variance keys (a lookup per tensor)"),
    _own("arcee_fusion", "Arcee Fusion", "https://arcee.ai",
         contract=Contract(base=BASE_REQUIRED, min_inputs=2, max_inputs=2), engine="fusion"),
    _own("nearswap", "NearSwap", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
         # t: a |delta| below which an element takes the fine-tune's value; evolve starts
         # it at the scale of bf16 fine-tuning deltas
         shared=(Param("t", x0=1e-3),), genes=("t",),
         contract=Contract(base=BASE_REQUIRED, min_inputs=2, max_inputs=2), engine="nearswap"),
    _own("ram", "Reinforced Agent Merging", "https://arxiv.org/abs/2601.13572",
         shared=(Param("epsilon", 1e-5),), contract=BASE_CONTRACT, engine="ram"),
    _own("ramplus_tl", "Reinforced Agent Merging Plus (Tensor-Local)", "https://arxiv.org/abs/2601.13572",
         shared=(Param("r", 0.1), Param("alpha", 0.2), Param("epsilon", 1e-5)),
         genes=("r", "alpha"), contract=BASE_CONTRACT, engine="ram"),
    _own("passthrough", "Passthrough", "",
         tensor=(Param("scale", scope=INPUT, optional=True),),
         contract=Contract(max_inputs=1), engine="stats", combine=True),
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
# The methods hotmerge applies (every other registered one is refused in one line).
SUPPORTED_METHODS: tuple = tuple(name for name, spec in METHODS.items() if spec.supported)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}: use one of {', '.join(METHOD_NAMES)}") from None
