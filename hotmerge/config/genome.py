"""Genome: flat CMA-ES vector <-> genotype (G, M, S, P) <-> merge recipe.

The layout and decoding rules are those of mergekit 0.1.5's `mergekit.evo.genome.
ModelGenome`; `to_mergekit_config` gives the same dict as its `genotype_merge_config`
(dumped with exclude_none), and `decode` gives, per source tensor, the parameter
values mergekit resolves when it merges that config. What was checked in mergekit's
source (plan.py, config.py, parameter_resolver.py, merge_methods/*):

- Pre weights (embeddings) are planned with slice 0's sources and parameters, post
  weights (final norm, lm_head) with the last slice's; both at gradient position t=0
  (MergePlanner.plan_module uses a ConfigReader with t=0). So with `smooth`, where the
  genome emits one `models:` entry list (one slice over all layers), pre and post
  weights both take the first gradient anchor, i.e. layer group 0's genes.
- Layer tensors get t = i / (L - 1) for layer i of a slice with L layers (t = 1 when
  L = 1) (MergePlanner.plan_slice). A gradient [v0..v(G-1)] evaluates to
  (1 - f) * v[i0] + f * v[min(G-1, i0+1)] with s = t * (G - 1), i0 = int(s), f = s - i0
  (config.evaluate_setting). Discrete slices hold scalars, so t plays no role there.
- Filters are tested against the source tensor name: a conditional matches when its
  filter is None (the catch-all, emitted last), "*" or a substring of the name; the
  first match wins (config.evaluate_setting).
- Task-arithmetic methods bind weight/density to non-base inputs only: a base model
  listed in genome.models has genes that mergekit ignores (its delta is zero and it
  is left out of the normalisation sum). decode() reports such a model as inactive
  with weight 0, which gives the same merge.
- linear + a base_model outside genome.models fails in mergekit 0.1.5 ("Missing
  required parameter weight" for the appended base source), and slerp + such a base
  gives 3 inputs to a 2-input method; config.py rejects both up front.
- gamma (breadcrumbs, 0.01) and epsilon (della, 0.15) have defaults in mergekit
  0.1.5, so the emitted config leaves them out. DELLA raises unless
  epsilon < density < 1 - epsilon, so DELLA densities are clipped into that range.
- Shared genes (nearswap's t, sce's select_topk, ramplus_tl's r and alpha: one value
  per merge in mergekit, MethodSpec.gene_scope SHARED) have no place in mergekit-evolve's
  genome. Here they take one gene per (layer group, filter set): the genotype is
  (G, 1, S, P), a gene starts at its registry default (or its Param.x0), decodes as |x|,
  and the emitted config writes it where mergekit reads a shared parameter: in each
  slice's `parameters` (discrete groups) or the top-level `parameters` (smooth: a
  gradient), with the filter conditionals as for per-model genes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np

from hotmerge.config.tokenizer import VOCAB_SOURCES, map_models
from hotmerge.models.folder import layer_index
from hotmerge.kernels.methods import METHODS, SHARED

if TYPE_CHECKING:  # genome.py only reads the schema; evolve.py imports this module
    from hotmerge.config.evolve import GenomeConfig

# Genes per (layer group, model, filter set), in genotype order.
METHOD_PARAMS: dict[str, tuple[str, ...]] = {name: spec.genes for name, spec in METHODS.items()}

# Per-model parameters that are not searched (gamma, epsilon): mergekit 0.1.5's defaults.
# (task_arithmetic's density is left out: it does nothing without a sparsification.)
FIXED_PARAMS: dict[str, dict[str, float]] = {
    name: {p.name: p.default for p in spec.tensor_params if p.name not in spec.genes + ("density",)}
    for name, spec in METHODS.items()
    if any(p.name not in spec.genes + ("density",) for p in spec.tensor_params)
}

# Keeps DELLA's density strictly inside (epsilon, 1 - epsilon).
DELLA_DENSITY_MARGIN = 1e-3

# Non-layer tensors before the layers (merged with layer group 0's values); every
# other non-layer tensor (final norm, lm_head) comes after them.
_PRE_WEIGHT_RE = re.compile(r"embed|(^|\.)(wte|wpe)\.")


def is_pre_weight(tensor_name: str) -> bool:
    return layer_index(tensor_name) is None and bool(_PRE_WEIGHT_RE.search(tensor_name))


@dataclass(frozen=True)
class TensorLocation:
    """Where a source tensor sits in the genotype."""

    group: Optional[int]  # discrete layer group; None in smooth mode
    t: float  # gradient position (smooth mode); 0 for pre/post weights
    filter_index: int  # param set: index of the first matching filter, else the catch-all


@dataclass(frozen=True)
class TensorRecipe:
    """The resolved merge parameters of one source tensor.

    params: name -> float64 array of length M (genome.models order); inactive models
    have weight 0. For slerp, params is empty and base/other/t are set (indices into
    genome.models; the result is slerp(t, models[base], models[other])).
    """

    name: str
    location: TensorLocation
    params: dict[str, np.ndarray]
    active: np.ndarray
    base: Optional[int] = None
    other: Optional[int] = None
    t: Optional[float] = None


@dataclass
class Recipe:
    """A decoded genotype: answers merge parameters for any source tensor name."""

    method: str
    num_layers: int
    layer_step: int  # layers per discrete group
    smooth: bool
    filters: tuple[str, ...]
    models: tuple[str, ...]
    base_model: Optional[str]
    base_index: Optional[int]  # index of base_model in models, if it is one of them
    normalize: bool
    rescale: bool
    int8_mask: bool
    fixed: dict[str, float]  # unsearched per-model params (gamma, epsilon)
    values: dict[str, np.ndarray]  # param -> (G, M, S) after abs/clamp
    slerp_groups: Optional[list[tuple[int, int, float]]] = None  # per group: base, other, t
    lambda_: float = 1.0

    @property
    def num_groups(self) -> int:
        return next(iter(self.values.values())).shape[0] if self.values else len(self.slerp_groups)

    def locate(self, tensor_name: str) -> TensorLocation:
        layer = layer_index(tensor_name)
        filter_index = len(self.filters)
        for i, f in enumerate(self.filters):
            if f == "*" or f in tensor_name:
                filter_index = i
                break
        last = self.num_groups - 1
        if self.smooth:
            if layer is None:
                t = 0.0  # pre and post weights are planned at t=0
            elif self.num_layers > 1:
                t = layer / (self.num_layers - 1)
            else:
                t = 1.0
            return TensorLocation(group=None, t=t, filter_index=filter_index)
        if layer is None:
            group = 0 if is_pre_weight(tensor_name) else last
        else:
            group = min(layer // self.layer_step, last)
        return TensorLocation(group=group, t=0.0, filter_index=filter_index)

    def tensor(self, tensor_name: str) -> TensorRecipe:
        loc = self.locate(tensor_name)
        m = len(self.models)
        active = np.ones(m, dtype=bool)
        if self.method == "slerp":
            base, other, t = self.slerp_groups[loc.group]
            return TensorRecipe(tensor_name, loc, {}, active, base=base, other=other, t=t)
        params = {}
        for name, vals in self.values.items():
            column = vals[:, :, loc.filter_index]  # (G, M)
            if self.smooth:
                params[name] = _gradient(column, loc.t)
            else:
                params[name] = column[loc.group].copy()
        spec = METHODS[self.method]
        if spec.gene_scope == SHARED:
            # one value per merge, carried as a per-model column (as merge configs carry it)
            params = {name: np.full(m, float(v[0])) for name, v in params.items()}
        if spec.takes_base and self.base_index is not None:
            active[self.base_index] = False
            if "weight" in params:
                params["weight"][self.base_index] = 0.0
        for name, v in self.fixed.items():
            params[name] = np.full(m, v, dtype=np.float64)
        if spec.functional:
            params["active"] = active.astype(np.float64)  # the functional methods' inputs
        return TensorRecipe(tensor_name, loc, params, active)

    def params(self, tensor_name: str) -> dict[str, np.ndarray]:
        return self.tensor(tensor_name).params

    def slerp(self, tensor_name: str) -> tuple[int, int, float]:
        r = self.tensor(tensor_name)
        return r.base, r.other, r.t


def _gradient(anchors: np.ndarray, t: float) -> np.ndarray:
    """mergekit's evaluate_setting on a list of G anchors, per model: anchors is (G, M)."""
    g = anchors.shape[0]
    scaled = t * (g - 1)
    i0 = int(scaled)
    i1 = min(g - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * anchors[i0] + frac * anchors[i1]


class Genome:
    """The search space of one genome config over models with num_layers layers."""

    def __init__(self, genome_def: GenomeConfig, num_layers: int):
        self.definition = genome_def
        self.num_layers = int(num_layers)
        self.method = genome_def.merge_method
        self.param_names = METHOD_PARAMS[self.method]
        k = genome_def.layer_granularity
        if k > 0 and self.num_layers % k != 0:
            raise ValueError(f"layer_granularity {k} does not divide {self.num_layers} layers")
        self.layer_step = k if k > 0 else self.num_layers
        self.filters = tuple(genome_def.filters or ())
        self.models = tuple(genome_def.models)
        self.base_model = genome_def.base_model
        spec = METHODS[self.method]
        # shared genes: one per (layer group, filter set), not one per model
        self.shared = spec.searchable and spec.gene_scope == SHARED
        self.shape = (
            self.num_layers // k if k > 0 else 1,
            1 if self.shared else len(self.models),
            len(self.filters) + 1,
            len(self.param_names),
        )
        self.size = int(np.prod(self.shape))
        n = genome_def.normalize
        # mergekit-evolve writes normalize explicitly: its own default when unset.
        self.normalize = METHODS[self.method].evolve_normalize if n is None else n

    @property
    def base_index(self) -> Optional[int]:
        if self.base_model is None or self.base_model not in self.models:
            return None
        return self.models.index(self.base_model)

    # -- vectors ------------------------------------------------------------

    def x0(self, random: bool = False, seed: Optional[int] = None) -> np.ndarray:
        """mergekit's initial_genotype() flattened: weight 1/M, other genes 1.

        mergekit builds it in float32 and CMA-ES gets it as float64, so the values are
        float32-rounded (1/3 -> 0.3333333432674408). random=True: uniform [0, 1).
        """
        if random:
            rng = np.random.default_rng(seed)
            return rng.random(self.size, dtype=np.float32).astype(np.float64)
        x = np.zeros(self.shape, dtype=np.float32)
        if self.shared:
            spec = METHODS[self.method]
            for i, name in enumerate(self.param_names):
                p = spec.gene_param(name)
                x[..., i] = p.x0 if p.default is None else p.default
            return x.reshape(-1).astype(np.float64)
        x[..., 0] = np.float32(1) / np.float32(self.shape[1])
        x[..., 1:] = 1
        return x.reshape(-1).astype(np.float64)

    def genotype(self, x) -> np.ndarray:
        """The flat vector as a (G, M, S, P) float64 array (C order, as mergekit's view)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape == self.shape:
            return x
        if x.ndim != 1 or x.size != self.size:
            raise ValueError(f"genotype has shape {x.shape}; expected ({self.size},) or {self.shape}")
        return x.reshape(self.shape)

    def param_values(self, x) -> dict[str, np.ndarray]:
        """param -> (G, M, S) values after mergekit's decode rules (abs, clamp)."""
        geno = self.genotype(x)
        out = {}
        for i, name in enumerate(self.param_names):
            v = geno[..., i]
            if name == "density":
                v = np.clip(np.abs(v), 0.0, 1.0)
                if "epsilon" in FIXED_PARAMS.get(self.method, {}):
                    eps = FIXED_PARAMS[self.method]["epsilon"] + DELLA_DENSITY_MARGIN
                    v = np.clip(v, eps, 1.0 - eps)
            elif not self.definition.allow_negative_weights:
                v = np.abs(v)
            out[name] = np.array(v, dtype=np.float64)
        return out

    def _slerp_groups(self, geno: np.ndarray) -> list[tuple[int, int, float]]:
        # torch.topk/softmax exactly as mergekit, so ties between genes (x0 has all
        # genes equal) break the same way.
        import torch

        groups = []
        for g in range(self.shape[0]):
            chosen = torch.topk(torch.from_numpy(geno[g, :, 0, 0].copy()), 2)
            t = torch.softmax(chosen.values, dim=-1)[1].item()
            groups.append((int(chosen.indices[0]), int(chosen.indices[1]), t))
        return groups

    # -- decoding -----------------------------------------------------------

    def decode(self, x) -> Recipe:
        geno = self.genotype(x)
        slerp = self.method == "slerp"
        return Recipe(
            method=self.method,
            num_layers=self.num_layers,
            layer_step=self.layer_step,
            smooth=self.definition.smooth,
            filters=self.filters,
            models=self.models,
            base_model=self.base_model,
            base_index=self.base_index,
            normalize=self.normalize,
            rescale=METHODS[self.method].default_rescale,
            int8_mask=True,
            fixed=dict(FIXED_PARAMS.get(self.method, {})),
            values={} if slerp else self.param_values(geno),
            slerp_groups=self._slerp_groups(geno) if slerp else None,
        )

    def to_mergekit_config(
        self, x, model_paths: Union[Mapping[str, str], Sequence[str], None] = None
    ) -> dict:
        """The mergekit merge config for x, as plain YAML-ready Python types.

        Equal to mergekit's `ModelGenome.genotype_merge_config(x).model_dump(
        exclude_none=True, mode="json")`. model_paths renames model references in the
        output: a mapping {path: name}, or a list of names for genome.models in order.
        """
        if model_paths is None:
            rename = {}
        elif isinstance(model_paths, Mapping):
            rename = dict(model_paths)
        else:
            if len(model_paths) != len(self.models):
                raise ValueError(f"model_paths has {len(model_paths)} names for {len(self.models)} models")
            rename = dict(zip(self.models, model_paths))

        def ref(p: str) -> str:
            return rename.get(p, p)

        geno = self.genotype(x)
        out: dict = {"merge_method": self.method}
        if self.base_model is not None:
            out["base_model"] = ref(self.base_model)
        values = {} if self.method == "slerp" else self.param_values(geno)
        per_model = {} if self.shared else values
        if self.method == "slerp":
            out["slices"] = self._slerp_slices(geno, ref)
        elif self.definition.smooth:
            out["models"] = self._smooth_models(per_model, ref)
        else:
            out["slices"] = self._discrete_slices(per_model, ref)
            if self.shared:
                for g, sl in enumerate(out["slices"]):
                    sl["parameters"] = {p: self._setting(v, 0, g) for p, v in values.items()}
        out["parameters"] = {"normalize": self.normalize, "int8_mask": True}
        if self.shared and self.definition.smooth:
            out["parameters"].update({p: self._setting(v, 0, None) for p, v in values.items()})
        out["dtype"] = "bfloat16"
        ts = self.definition.tokenizer_source
        if ts is not None:
            out["tokenizer_source"] = ts if ts in VOCAB_SOURCES else ref(ts)
        if self.definition.tokenizer is not None:
            out["tokenizer"] = map_models(self.definition.tokenizer, ref).model_dump(exclude_none=True, mode="json")
        return out

    def _extra_base(self) -> bool:
        # mergekit-evolve adds the base model as a parameterless source when it is
        # not one of the searched models.
        return self.base_model is not None and self.base_model not in self.models

    def _layer_range(self, g: int) -> list[int]:
        return [g * self.layer_step, (g + 1) * self.layer_step]

    def _setting(self, values: np.ndarray, m: int, g: Optional[int]):
        """One model's setting for one param: scalar/gradient, or filter conditionals.

        values is (G, M, S); g is the slice, or None for a gradient over all groups.
        """

        def value(s: int):
            if g is not None:
                return float(values[g, m, s])
            anchors = [float(v) for v in values[:, m, s]]
            return anchors[0] if len(anchors) == 1 else anchors

        if not self.filters:
            return value(0)
        out = [{"filter": f, "value": value(s)} for s, f in enumerate(self.filters)]
        out.append({"value": value(len(self.filters))})  # catch-all: filter None
        return out

    def _discrete_slices(self, values: dict[str, np.ndarray], ref) -> list[dict]:
        slices = []
        for g in range(self.shape[0]):
            sources = []
            for m, model in enumerate(self.models):
                source = {"model": ref(model), "layer_range": self._layer_range(g)}
                if values:
                    source["parameters"] = {p: self._setting(v, m, g) for p, v in values.items()}
                sources.append(source)
            if self._extra_base():
                sources.append({"model": ref(self.base_model), "layer_range": self._layer_range(g)})
            slices.append({"sources": sources})
        return slices

    def _smooth_models(self, values: dict[str, np.ndarray], ref) -> list[dict]:
        models = []
        for m, model in enumerate(self.models):
            entry = {"model": ref(model)}
            if values:
                entry["parameters"] = {p: self._setting(v, m, None) for p, v in values.items()}
            models.append(entry)
        if self._extra_base():
            models.append({"model": ref(self.base_model)})
        return models

    def _slerp_slices(self, geno: np.ndarray, ref) -> list[dict]:
        slices = []
        for g, (base, other, t) in enumerate(self._slerp_groups(geno)):
            sources = [
                {"model": ref(self.models[i]), "layer_range": self._layer_range(g)}
                for i in (base, other)
            ]
            if self.definition.tokenizer_source:
                sources[0]["parameters"] = {"weight": 1 - t}
                sources[1]["parameters"] = {"weight": t}
            if self._extra_base():
                sources.append({"model": ref(self.base_model), "layer_range": self._layer_range(g)})
            slices.append({"sources": sources, "base_model": ref(self.models[base]), "parameters": {"t": t}})
        return slices
