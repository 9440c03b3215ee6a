"""Apply a decoded recipe to the live weights.

The sources stay resident; per candidate, every live tensor is merged and the
result is checked for non-finite values before anything is written, so a failed
candidate leaves the live model as it was.
"""

from __future__ import annotations

import numpy as np
import torch

from hotmerge.engine.config import ValidatedConfig
from hotmerge.engine.deltas import ResidentSources
from hotmerge.engine.errors import ConfigError
from hotmerge.kernels.reference import merge_tensor


class NonFiniteMerge(FloatingPointError):
    pass


class Merger:
    def __init__(self, validated: ValidatedConfig, live: dict[str, torch.Tensor], seed: int = 0):
        source_names = validated.reference.tensors
        unknown = [n for n in live if n not in source_names]
        if unknown:
            raise ConfigError(
                f"live parameter {unknown[0]} has no tensor of that name in {validated.reference.path}: "
                "the models must be saved in the transformers layout"
            )
        self.live = live
        self.names = list(live)
        # Random-stream key per tensor: its position among the source tensor names,
        # which every runtime and mergekit export see the same way.
        order = sorted(source_names)
        self.tensor_keys = {name: order.index(name) for name in self.names}
        device = next(iter(live.values())).device
        self.sources = ResidentSources(validated, self.names, device=device)
        self.seed = seed

    def merge_one(self, recipe, name: str) -> torch.Tensor:
        tensor = recipe.tensor(name)
        models = self.sources.models
        if recipe.method == "slerp":
            return merge_tensor("slerp", models[tensor.base][name], [models[tensor.other][name]],
                                {"t": tensor.t}, normalize=False)
        active = np.flatnonzero(tensor.active)
        params = {k: np.asarray(v)[active] for k, v in tensor.params.items()}
        base = self.sources.base[name] if self.sources.base is not None else None
        return merge_tensor(
            recipe.method, base, [models[i][name] for i in active], params,
            normalize=recipe.normalize, lambda_=recipe.lambda_, seed=self.seed,
            tensor_key=self.tensor_keys[name], model_keys=[int(i) for i in active],
            rescale=recipe.rescale,
        )

    @torch.no_grad()
    def apply(self, recipe) -> None:
        merged = {}
        for name in self.names:
            out = self.merge_one(recipe, name)
            if not torch.isfinite(out).all():
                raise NonFiniteMerge(f"the merge of {name} has non-finite values; live weights unchanged")
            merged[name] = out
        for name, out in merged.items():
            self.live[name].data.copy_(out)
