"""Write a merged model folder with the same engine the search uses.

Inputs: a genome config plus a genotype, or a mergekit merge config of the shape
hotmerge writes as best_config.yaml (and mergekit-evolve writes too). A merge
config is turned back into a genome config and a genotype that decodes to exactly
its parameters, so both inputs take one path.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from hotmerge.engine.config import ValidatedConfig, parse_config, validate_config
from hotmerge.engine.errors import ConfigError
from hotmerge.engine.genome import METHOD_PARAMS

# slerp genes: the winner's gene sits at SLERP_TOP, so both genes stay positive for t >= 1e-4.
SLERP_TOP = 10.0


def export_merge(validated: ValidatedConfig, x: np.ndarray, out_dir: str | Path, seed: int = 0) -> Path:
    """Merge genotype x into the base layout and save an HF model folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hotmerge.engine.merger import Merger

    out_dir = Path(out_dir)
    reference = validated.reference.path
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.bfloat16)
    merger = Merger(validated, dict(model.named_parameters()), seed=seed)
    merger.apply(validated.genome().decode(x))
    tokenizer_source = validated.config.genome.tokenizer_source
    if tokenizer_source in (None, "base", "union"):
        tokenizer_source = reference
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if any(Path(tokenizer_source).glob("tokenizer*")):
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def load_merge_config(path: str | Path) -> tuple[ValidatedConfig, np.ndarray]:
    """A mergekit merge config -> (validated genome config, genotype)."""
    path = Path(path)
    try:
        merge = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read merge config {path} ({e}): check the path and the YAML") from None
    if not isinstance(merge, dict) or "merge_method" not in merge:
        raise ConfigError(f"{path} is not a mergekit merge config (no merge_method): pass a merge config, "
                          "or a genome config with --genotype")
    method = merge["merge_method"]
    if method not in METHOD_PARAMS:
        raise ConfigError(f"{path}: merge_method {method!r} is not supported: use one of {', '.join(METHOD_PARAMS)}")
    params = merge.get("parameters") or {}
    if method == "slerp":
        genome, x = _slerp_genome(merge, path)
    elif merge.get("slices"):
        genome, x = _sliced_genome(merge, method, path)
    elif merge.get("models"):
        genome, x = _smooth_genome(merge, method, path)
    else:
        raise ConfigError(f"{path} has neither slices nor models: write one of them")
    genome.update(merge_method=method, allow_negative_weights=True)
    if "normalize" in params:
        genome["normalize"] = bool(params["normalize"])
    if merge.get("base_model") is not None:
        genome["base_model"] = merge["base_model"]
    if merge.get("tokenizer_source") is not None:
        genome["tokenizer_source"] = merge["tokenizer_source"]
    def validated_with(genome: dict) -> ValidatedConfig:
        cfg = parse_config({"genome": genome, "tasks": ["unused"]}, base_dir=path.resolve().parent,
                           source=str(path))
        return validate_config(cfg)

    validated = validated_with(genome)
    if x.ndim == 2:  # smooth: G gradient anchors over the layers
        groups, layers = x.shape[0], validated.num_layers
        if groups > 1:
            if layers % groups:
                raise ConfigError(f"{path}: gradients of {groups} values over {layers} layers: "
                                  f"use a number of values that divides {layers}")
            genome["layer_granularity"] = layers // groups
            validated = validated_with(genome)
        x = x.reshape(-1)
    return validated, x


def _values_by_filter(value, path: Path) -> dict:
    """A parameter: a number, or a list of {filter, value} -> {filter or None: value}."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return {item.get("filter"): item["value"] for item in value}
    return {None: value}


def _filters_of(entries: list[dict]) -> list[str]:
    filters: list[str] = []
    for entry in entries:
        for value in (entry.get("parameters") or {}).values():
            for f in _values_by_filter(value, Path()):
                if f is not None and f not in filters:
                    filters.append(f)
    return filters


def _sliced_genome(merge: dict, method: str, path: Path) -> tuple[dict, np.ndarray]:
    slices = merge["slices"]
    base = merge.get("base_model")
    searched = [s for s in slices[0]["sources"] if s.get("parameters") or s["model"] != base]
    models = [s["model"] for s in searched]
    filters = _filters_of([s for sl in slices for s in sl["sources"]])
    step = slices[0]["sources"][0]["layer_range"][1] - slices[0]["sources"][0]["layer_range"][0]
    names = METHOD_PARAMS[method]
    x = np.zeros((len(slices), len(models), len(filters) + 1, len(names)))
    for g, sl in enumerate(slices):
        by_model = {s["model"]: s.get("parameters") or {} for s in sl["sources"]}
        for m, model in enumerate(models):
            for p, name in enumerate(names):
                if name not in by_model.get(model, {}):
                    raise ConfigError(f"{path}: slice {g} gives {model} no {name}: every source needs it")
                values = _values_by_filter(by_model[model][name], path)
                for s, f in enumerate(filters + [None]):
                    x[g, m, s, p] = values.get(f, values.get(None, 0.0))
    genome = {"models": models, "layer_granularity": step if len(slices) > 1 else 0,
              "filters": filters or None}
    return genome, x.reshape(-1)


def _smooth_genome(merge: dict, method: str, path: Path) -> tuple[dict, np.ndarray]:
    base = merge.get("base_model")
    entries = [e for e in merge["models"] if e.get("parameters") or e["model"] != base]
    models = [e["model"] for e in entries]
    filters = _filters_of(entries)
    names = METHOD_PARAMS[method]
    anchors = {}
    for e in entries:
        for name in names:
            for f, v in _values_by_filter(e["parameters"][name], path).items():
                anchors[(e["model"], name, f)] = v if isinstance(v, list) else [v]
    groups = max(len(v) for v in anchors.values())
    if any(len(v) not in (1, groups) for v in anchors.values()):
        raise ConfigError(f"{path}: gradients of different lengths: use one length for every parameter")
    x = np.zeros((groups, len(models), len(filters) + 1, len(names)))
    for m, model in enumerate(models):
        for p, name in enumerate(names):
            for s, f in enumerate(filters + [None]):
                v = anchors.get((model, name, f), anchors.get((model, name, None)))
                x[:, m, s, p] = v if len(v) == groups else v * groups
    # layer_granularity is set once the layer count is known (load_merge_config).
    genome = {"models": models, "smooth": True, "filters": filters or None, "layer_granularity": 0}
    return genome, x.reshape(groups, -1)


def _slerp_genome(merge: dict, path: Path) -> tuple[dict, np.ndarray]:
    slices = merge.get("slices") or []
    if not slices:
        raise ConfigError(f"{path}: a slerp merge config needs slices")
    models: list[str] = []
    for sl in slices:
        for s in sl["sources"][:2]:
            if s["model"] not in models:
                models.append(s["model"])
    step = slices[0]["sources"][0]["layer_range"][1] - slices[0]["sources"][0]["layer_range"][0]
    x = np.zeros((len(slices), len(models), 1, 1))
    for g, sl in enumerate(slices):
        t = float((sl.get("parameters") or merge.get("parameters") or {})["t"])
        if not 0 < t <= 0.5:
            raise ConfigError(f"{path}: slice {g} has t={t}; mergekit-evolve's slerp writes 0 < t <= 0.5 "
                              "with the slice's base_model first: swap the two models and use 1-t")
        first = sl.get("base_model", sl["sources"][0]["model"])
        second = next(s["model"] for s in sl["sources"][:2] if s["model"] != first)
        x[g, models.index(first), 0, 0] = SLERP_TOP
        x[g, models.index(second), 0, 0] = SLERP_TOP + math.log(t / (1 - t))
    genome = {"models": models, "layer_granularity": step if len(slices) > 1 else 0}
    return genome, x.reshape(-1)
