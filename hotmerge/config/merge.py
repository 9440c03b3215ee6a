"""mergekit merge configs (what `mergekit-yaml` takes), read as mergekit 0.1.5 reads them.

A merge config is resolved per source tensor into the recipe the merge engine
applies: every parameter mergekit accepts for the method is honoured, with its
precedence (a source's own `parameters`, then its slice's, then the top-level
`parameters`, then the method's registry default), filters (substring of the
tensor name, first match wins, `*` and no filter match all; a list that matches
nothing falls through to the next level) and gradients (interpolated at
t = i / (n - 1) for layer i of an n-layer slice; embeddings at t = 0 with the
first slice, final norm and lm_head at t = 0 with the last one). What mergekit
does and hotmerge cannot reproduce exactly is a ConfigError that names it: nothing
is dropped silently.

The reading follows mergekit's MergePlanner (plan.py), ConfigReader.parameter_sources
and evaluate_setting (config.py) and resolve_parameters (parameter_resolver.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from hotmerge.config.evolve import ValidatedConfig, parse_config, resolve_model_path, validate_config
from hotmerge.errors import ConfigError
from hotmerge.config.genome import TensorLocation, TensorRecipe, is_pre_weight
from hotmerge.models.folder import layer_index, layer_stack, layer_stacks
from hotmerge.models.hub import resolve_reference
from hotmerge.kernels.methods import METHOD_NAMES, METHODS, SUPPORTED_METHODS, MethodSpec, Sparsification, get_method

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
                  "out_dtype", "tokenizer_source", "tokenizer", "chat_template")
SLICE_KEYS = ("sources", "base_model", "residual_weight", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODEL_KEYS = ("model", "parameters")
# The merge dtype: mergekit computes in `dtype`, or in the stored dtype without one. The
# kernels compute in float32 from 16-bit sources and round once (kernels/reference.py).
MERGE_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}
STORED_DTYPES = {"BF16": "bfloat16", "F16": "float16"}
OUT_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
              "float32": "float32", "fp32": "float32"}
# The global parameters the engine applies once per merge (the kernels take scalars).
SHARED_ONCE = ("normalize", "rescale", "lambda", "int8_mask")
KNOWN_PARAMETERS = {p.name for spec in METHODS.values() for p in spec.tensor_params + spec.global_params}
ALL_LAYERS = -1  # the stop of the one slice a `models:` merge makes, until the layer count is known


@dataclass
class MergeConfigRecipe:
    """A merge config resolved for every source tensor: what Merger and the runtimes apply."""

    method: str
    models: tuple  # the sources, base excluded for task-arithmetic methods
    base_model: Optional[str]
    normalize: bool
    rescale: bool
    lambda_: float
    int8_mask: bool
    tensors: dict  # source tensor name -> TensorRecipe
    dtype: str = "bfloat16"  # what the merge computes in (its sources' rounding)
    out_dtype: Optional[str] = None
    base_index: Optional[int] = None
    chat_template: Optional[str] = None  # the merged tokenizer's template (Jinja text), as mergekit sets it

    def tensor(self, tensor_name: str) -> TensorRecipe:
        try:
            return self.tensors[tensor_name]
        except KeyError:
            raise KeyError(f"the merge config has no recipe for tensor {tensor_name}") from None

    def params(self, tensor_name: str) -> dict:
        return self.tensor(tensor_name).params


@dataclass(frozen=True)
class _Slice:
    start: int  # first output layer
    stop: int
    sources: tuple  # ((model, parameters or None), ...)
    base_model: Optional[str]
    parameters: Optional[dict]


def load_merge_config(path, allow_crimes: bool = False) -> tuple[ValidatedConfig, MergeConfigRecipe]:
    """Read a mergekit merge config file: (the models, checked; the resolved recipe).
    allow_crimes: mergekit's flag, architectures may differ (validate_config)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read merge config {path} ({e.strerror}): check the path") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML ({e}): fix the YAML syntax") from None
    if not isinstance(data, dict) or "merge_method" not in data:
        raise ConfigError(f"{path} is not a mergekit merge config (no merge_method): pass a merge config, "
                          "or a genome config with --genotype")
    return read_merge_config(data, base_dir=path.resolve().parent, source=str(path), allow_crimes=allow_crimes)


def read_merge_config(data: dict, base_dir=None, source: str = "merge config", allow_crimes: bool = False
                      ) -> tuple[ValidatedConfig, MergeConfigRecipe]:
    reader = _Reader(data, base_dir, source, allow_crimes)
    return reader.validated, reader.recipe()


class _Reader:
    def __init__(self, data: dict, base_dir, source: str, allow_crimes: bool = False):
        self.source = source
        self.base_dir = base_dir
        self._local: dict[str, str] = {}
        _check_keys(data, TOP_LEVEL_KEYS, "", self.fail)
        method = data["merge_method"]
        if method not in METHOD_NAMES:
            self.fail(f"merge_method {method!r} is not supported: use one of {', '.join(SUPPORTED_METHODS)}")
        self.spec: MethodSpec = get_method(method)
        try:
            self.spec.refuse_unless_supported()
        except ValueError as e:
            self.fail(str(e))
        self._check_unsupported(data)
        self.parameters = self._parameters(data.get("parameters"), "parameters")
        self.base_model = self._path(data["base_model"], "base_model") if data.get("base_model") else None
        self.slices = self._slices(data)
        self.models = self._models()
        self.out_dtype = OUT_DTYPES[data["out_dtype"]] if data.get("out_dtype") else None
        genome = {"models": list(self.models), "merge_method": method, "allow_negative_weights": True}
        if self.spec.takes_base:
            genome["base_model"] = self.base_model
        for key in ("tokenizer_source", "tokenizer"):
            if data.get(key) is not None:
                genome[key] = data[key]
        cfg = parse_config({"genome": genome, "tasks": ["unused"]}, base_dir=base_dir, source=source, search=False)
        self.validated = validate_config(cfg, inputs_of=self._vocabulary_inputs, tokenizer_base=self.base_model,
                                         allow_crimes=allow_crimes)
        self.dtype = self._merge_dtype(data.get("dtype"))
        self._check_layers()
        self.chat_template = self._chat_template(data.get("chat_template"))

    def fail(self, message: str):
        raise ConfigError(f"{self.source}: {message}")

    def _chat_template(self, value) -> Optional[str]:
        """mergekit's chat_template as Jinja text: "auto" (the template most of the models'
        tokenizers carry; none when none does), the name of one of mergekit's templates, or
        a template itself."""
        if not value:
            return None
        if not isinstance(value, str):
            self.fail(f"chat_template is {value!r}: give auto, a template name or the template's text")
        if value == "auto":
            from collections import Counter

            from transformers import AutoTokenizer

            found = []
            for folder in dict.fromkeys([m for m in (self.base_model, *self.models) if m]):
                try:
                    template = AutoTokenizer.from_pretrained(folder.partition("+")[0]).chat_template
                except (OSError, ValueError):
                    continue  # a model without a tokenizer takes no part, as in mergekit
                if isinstance(template, dict):
                    template = template.get("default")
                if template:
                    found.append(template.strip())
            return Counter(found).most_common(1)[0][0] if found else None
        if len(value) < 256 and "\n" not in value and "{" not in value:
            try:  # a name: mergekit's own templates are the ones it names
                import importlib.resources

                from mergekit._data import chat_templates
            except ImportError:
                self.fail(f"chat_template {value} names one of mergekit's templates, which are read from the "
                          "mergekit package: install mergekit, or give the template's Jinja text")
            file = importlib.resources.files(chat_templates).joinpath(value + ".jinja")
            if file.is_file():
                return file.read_text()
        if len(value) < 20 or "{" not in value:
            self.fail(f"chat_template {value!r} is neither auto, one of mergekit's template names nor a Jinja "
                      "template: fix it")
        return value

    # -- structure ----------------------------------------------------------------

    def _check_unsupported(self, data: dict) -> None:
        if data.get("modules"):
            self.fail("modules: is not supported: write the merge with slices: or models:")
        for key in ("dtype", "out_dtype"):
            if data.get(key) is not None and not isinstance(data[key], str):
                self.fail(f"{key} is {data[key]!r}: use a dtype name such as bfloat16")
        if data.get("out_dtype") is not None and data["out_dtype"] not in OUT_DTYPES:
            self.fail(f"out_dtype {data['out_dtype']} is not supported: use one of {', '.join(OUT_DTYPES)}")
        if bool(data.get("slices")) == bool(data.get("models")):
            self.fail("exactly one of models: and slices: must be present: write one of them")

    def _merge_dtype(self, dtype: Optional[str]) -> str:
        if dtype is not None:
            if dtype not in MERGE_DTYPES:
                self.fail(f"dtype {dtype} is not supported: hotmerge merges 16-bit weights: set dtype to "
                          "bfloat16 or float16")
            return MERGE_DTYPES[dtype]
        infos = self.validated.models + ([self.validated.base] if self.validated.base else [])
        stored = {t.dtype for info in infos for t in info.tensors.values()}
        if len(stored) != 1 or next(iter(stored)) not in STORED_DTYPES:
            self.fail(f"no dtype, and the models store {'/'.join(sorted(stored))} tensors, which mergekit "
                      "would merge in that precision: set dtype: bfloat16 (or float16)")
        return STORED_DTYPES[stored.pop()]

    def _path(self, value: Any, where: str) -> str:
        """A model reference as local folders (hub names resolved once per reference), so
        that the slices, the recipe and the checked models all name the same folders."""
        if not isinstance(value, str):
            self.fail(f"{where} is {value!r}: give a model folder or a hub repository name")
        if value not in self._local:
            try:
                self._local[value] = resolve_reference(resolve_model_path(value, self.base_dir))
            except ValueError as e:
                self.fail(f"{where} {e}")
            except ConfigError as e:
                self.fail(f"{where}: {e}")
        return self._local[value]

    def _parameters(self, value: Any, where: str) -> Optional[dict]:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(f"{where} is {value!r}: write a mapping of parameter names to values")
        # mergekit ignores parameters its method does not take (mergekit-evolve writes
        # normalize and int8_mask for every method); a name no method takes is a typo.
        for name in value:
            if name not in KNOWN_PARAMETERS:
                takes = [p.name for p in self.spec.tensor_params + self.spec.global_params]
                self.fail(f"{where}.{name} is not a merge parameter: fix the spelling or remove it "
                          f"({self.spec.name} takes {', '.join(takes)})")
        return value

    def _slices(self, data: dict) -> list[_Slice]:
        if data.get("models"):
            if not isinstance(data["models"], list):
                self.fail("models: must be a list of {model, parameters} entries")
            sources = []
            for i, entry in enumerate(data["models"]):
                entry = {"model": entry} if isinstance(entry, str) else entry
                _check_keys(entry, MODEL_KEYS, f"models[{i}]", self.fail)
                sources.append((self._path(entry.get("model"), f"models[{i}].model"),
                                self._parameters(entry.get("parameters"), f"models[{i}].parameters")))
            if self.base_model is not None and self.base_model not in [m for m, _ in sources]:
                sources.append((self.base_model, None))  # mergekit adds the base as an input
            return [_Slice(0, ALL_LAYERS, tuple(sources), None, None)]
        if not isinstance(data["slices"], list):
            self.fail("slices: must be a list of {sources: [...]} entries")
        out, next_layer = [], 0
        for i, sl in enumerate(data["slices"]):
            where = f"slices[{i}]"
            if not isinstance(sl, dict):
                self.fail(f"{where} is not a mapping: write sources: under it")
            _check_keys(sl, SLICE_KEYS, where, self.fail)
            if sl.get("residual_weight") is not None:
                self.fail(f"{where}.residual_weight is not supported: remove it")
            sources, ranges = [], set()
            for j, src in enumerate(sl.get("sources") or []):
                _check_keys(src, SOURCE_KEYS, f"{where}.sources[{j}]", self.fail)
                lr = src.get("layer_range")
                if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, int) for v in lr)
                        and 0 <= lr[0] < lr[1]):
                    self.fail(f"{where}.sources[{j}].layer_range is {lr!r}: use [first, end) layer numbers")
                ranges.add(tuple(lr))
                sources.append((self._path(src.get("model"), f"{where}.sources[{j}].model"),
                                self._parameters(src.get("parameters"), f"{where}.sources[{j}].parameters")))
            if not sources:
                self.fail(f"{where} has no sources: list the models it merges")
            if len(ranges) != 1:
                self.fail(f"{where} takes different layer ranges from its sources {sorted(ranges)}: hotmerge "
                          "merges layers in place, so every source of a slice must take the same layers")
            start, stop = ranges.pop()
            if start != next_layer:
                self.fail(f"{where} takes layers [{start}, {stop}) where the output's next layer is "
                          f"{next_layer}: hotmerge merges layers in place (no reordering or stacking), so the "
                          "slices must cover the layers in order")
            next_layer = stop
            base = self._path(sl["base_model"], f"{where}.base_model") if sl.get("base_model") else None
            out.append(_Slice(start, stop, tuple(sources), base,
                              self._parameters(sl.get("parameters"), f"{where}.parameters")))
        return out

    def _models(self) -> tuple:
        seen: list[str] = []
        for i, sl in enumerate(self.slices):
            names = [m for m, _ in sl.sources]
            if len(set(names)) != len(names):
                self.fail(f"slice {i} lists a model twice: list each model once per slice")
            base = sl.base_model or self.base_model
            if self.spec.name == "slerp":
                if len(names) != 2:
                    self.fail(f"slerp takes exactly 2 models per slice, slice {i} has {len(names)}: "
                              "list two sources")
                if base not in names:
                    self.fail(f"slerp needs base_model to be one of the two sources of slice {i}: "
                              "set base_model to one of them")
            elif self.spec.takes_base and (base is not None or self.spec.needs_base):
                if base is None:
                    self.fail(f"{self.spec.name} needs base_model: add base_model (the model the others "
                              "were fine-tuned from)")
                if base != self.base_model:
                    self.fail(f"slice {i} has base_model {base} where the merge's is {self.base_model}: "
                              "use one base_model for every slice")
                if base not in names:
                    self.fail(f"slice {i} does not list base_model {base} among its sources, which mergekit "
                              "requires: add it to the slice's sources")
            if self.spec.functional:
                self._check_contract(i, [m for m in names if not (self.spec.takes_base and m == base)])
            for m in names:
                if m not in seen and (not self.spec.takes_base or m != self.base_model):
                    seen.append(m)
        if not seen:
            self.fail("the merge lists no model besides the base: add the models to merge")
        return tuple(seen)

    def _check_contract(self, i: int, inputs: list) -> None:
        """mergekit's input contract for one slice (inputs: its sources besides the base)."""
        c, n = self.spec.contract, len(inputs)
        with_base = self.spec.takes_base and (self.slices[i].base_model or self.base_model) is not None
        lo, hi = c.non_base_range(with_base)
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if hi == lo else f"{lo} to {hi}" if hi is not None else f"at least {lo}"
            what = "models besides the base" if with_base else "models"
            self.fail(f"{self.spec.name} merges {want} {what} per slice, slice {i} has {n}: list {want}")

    def _check_layers(self) -> None:
        # mergekit places a layer within its own stack (a vision tower's layers by the
        # tower's count): with several stacks, only a merge over whole models says which
        self.stacks = layer_stacks(self.validated.reference.tensors)
        if len(self.stacks) > 1 and self.slices[0].stop != ALL_LAYERS:
            self.fail(f"slices: over a model with {len(self.stacks)} stacks of layers "
                      f"({', '.join(p.rstrip('.') for p in self.stacks)}) is not supported: write the merge "
                      "with models:")
        n = self.validated.num_layers
        if self.slices[0].stop == ALL_LAYERS:
            self.slices[0] = replace(self.slices[0], stop=n)
        elif self.slices[-1].stop != n:
            self.fail(f"the slices cover layers [0, {self.slices[-1].stop}) of a {n}-layer model: cover "
                      f"every layer, ending at {n}")

    def _vocabulary_inputs(self, name: str) -> tuple:
        """What mergekit gathers for a vocabulary tensor: its slice's sources, in order, and base."""
        sl = self.slices[0] if is_pre_weight(name) else self.slices[-1]
        return tuple(m for m, _ in sl.sources), sl.base_model or self.base_model

    # -- resolution ---------------------------------------------------------------

    def recipe(self) -> MergeConfigRecipe:
        spec = self.spec
        tensors, shared_seen = {}, {}
        for name in self.validated.reference.tensors:
            sl, t = self._where(name)
            shared = {p.name: self._resolve(p, name, t, sl, None) for p in spec.global_params}
            for key in SHARED_ONCE:
                if key in shared:
                    first = shared_seen.setdefault(key, (shared[key], name))
                    if first[0] != shared[key]:
                        self.fail(f"parameter {key} is {first[0]} for {first[1]} but {shared[key]} for {name}: "
                                  f"hotmerge applies one {key} per merge: give it a single value")
            tensors[name] = self._tensor(name, sl, t, shared)
        defaults = {p.name: p.default for p in spec.global_params}
        value = {k: (shared_seen[k][0] if k in shared_seen else defaults.get(k)) for k in SHARED_ONCE}
        return MergeConfigRecipe(
            method=spec.name, models=self.models,
            base_model=self.base_model if spec.takes_base else None,
            normalize=bool(value["normalize"]), rescale=bool(value["rescale"]),
            lambda_=float(value["lambda"]) if value["lambda"] is not None else 1.0,
            int8_mask=bool(value["int8_mask"]), tensors=tensors, dtype=self.dtype, out_dtype=self.out_dtype,
            chat_template=self.chat_template)

    def _where(self, name: str) -> tuple[_Slice, float]:
        layer = layer_index(name)
        if layer is None:
            return (self.slices[0] if is_pre_weight(name) else self.slices[-1]), 0.0
        if len(self.stacks) > 1:  # one slice over the whole models: t within the layer's stack
            n = self.stacks[layer_stack(name)]
            return self.slices[0], (layer / (n - 1) if n > 1 else 1.0)
        for sl in self.slices:
            if sl.start <= layer < sl.stop:
                n = sl.stop - sl.start
                return sl, ((layer - sl.start) / (n - 1) if n > 1 else 1.0)
        self.fail(f"no slice covers layer {layer} of tensor {name}: cover every layer")

    def _resolve(self, param, name: str, t: float, sl: _Slice, model: Optional[str]):
        scopes = []
        if model is not None:
            scopes += [p for m, p in sl.sources if m == model]
        scopes += [sl.parameters, self.parameters]
        for scope in scopes:
            if scope is not None and param.name in scope:
                value = _evaluate(name, scope[param.name], t, lambda v: self._validate(param, v, name))
                if value is not None:
                    return value
        if param.required:
            who = f"model {model}, " if model is not None else ""
            self.fail(f"parameter {param.name} is missing for {who}tensor {name}: give {param.name} for it")
        return param.default

    def _validate(self, param, value, name: str):
        kind = bool if isinstance(param.default, bool) else float
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
                return value.lower() in ("true", "yes", "on")
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
        else:
            try:
                if not isinstance(value, bool):
                    out = float(value)
                    if np.isfinite(out):
                        return out
            except (TypeError, ValueError):
                pass
        self.fail(f"parameter {param.name} is {value!r} for tensor {name}: use "
                  f"{'true or false' if kind is bool else 'a finite number'}")

    def _tensor(self, name: str, sl: _Slice, t: float, shared: dict) -> TensorRecipe:
        spec, m = self.spec, len(self.models)
        location = TensorLocation(group=None, t=t, filter_index=0)
        in_slice = [model for model, _ in sl.sources]
        active = np.array([model in in_slice for model in self.models])
        if spec.name == "slerp":
            base = sl.base_model or self.base_model
            other = next(model for model in in_slice if model != base)
            return TensorRecipe(name, location, {}, active, base=self.models.index(base),
                                other=self.models.index(other), t=float(shared["t"]))
        # the one optional parameter, passthrough's scale, leaves the tensor as it is when
        # unset: as a scale of 1 does
        params = {p.name: np.full(m, 0.0 if p.required else 1.0 if p.default is None else float(p.default))
                  for p in spec.tensor_params}
        for i, model in enumerate(self.models):
            if not active[i]:
                continue
            for p in spec.tensor_params:
                value = self._resolve(p, name, t, sl, model)
                params[p.name][i] = 1.0 if value is None else value
        if spec.functional:
            # shared values travel as per-model columns; active: this tensor's inputs
            params.update({key: np.full(m, float(value)) for key, value in shared.items()})
            params["active"] = active.astype(np.float64)
        if spec.sparsification is Sparsification.della_magprune:
            d, eps = params["density"], params["epsilon"]
            bad = active & (d > 0) & (d < 1) & ((d + eps >= 1) | (d - eps <= 0))
            if bad.any():
                i = int(np.argmax(bad))
                self.fail(f"{spec.name} needs density +/- epsilon inside (0, 1), but {self.models[i]} has "
                          f"density {d[i]} and epsilon {eps[i]} for {name}: lower epsilon or move density")
        return TensorRecipe(name, location, params, active)


def _evaluate(tensor_name: str, setting, t: float, validate):
    """mergekit's evaluate_setting: a scalar, a gradient, or a list of {filter, value} conditionals."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [validate(e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return validate((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise ConfigError(f"parameter setting {cond!r} is not a value, a gradient or a "
                                  "{filter, value} entry: fix it")
            f = cond.get("filter")
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return _evaluate(tensor_name, cond["value"], t, validate)
        return None
    raise ConfigError(f"parameter setting {setting!r} is not a value, a gradient or a list of "
                      "{filter, value} entries: fix it")


def _check_keys(entry: Any, allowed: tuple, where: str, fail) -> None:
    if not isinstance(entry, dict):
        fail(f"{where or 'the merge config'} is not a mapping: write {', '.join(allowed)} keys")
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        at = f" in {where}" if where else ""
        fail(f"unknown key '{unknown[0]}'{at}: remove it or fix the spelling (allowed: {', '.join(allowed)})")
