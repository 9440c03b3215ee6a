"""Apply a decoded recipe to the live weights of an in-process (transformers) model.

The sources are packed once into the fused engine's flat layout (one segment per
live tensor); per candidate, the recipe becomes a small coefficient table and one
fused pass writes every live tensor in place. A candidate that would produce
non-finite values raises before anything is written.
"""

from __future__ import annotations

import numpy as np
import torch

from hotmerge.engine.config import ValidatedConfig
from hotmerge.engine.errors import ConfigError
from hotmerge.engine.modelinfo import iter_tensors
from hotmerge.kernels import FlatSources, apply, build_table


def recipe_params(recipe, names: list[str]) -> dict[str, np.ndarray]:
    """The recipe as per-segment parameter rows: {param: [S, M]} (slerp: t [S], pair [S, 2])."""
    tensors = [recipe.tensor(name) for name in names]
    if recipe.method == "slerp":
        return {"t": np.array([t.t for t in tensors]),
                "pair": np.array([(t.base, t.other) for t in tensors], dtype=np.int64)}
    return {key: np.stack([t.params[key] for t in tensors]) for key in tensors[0].params}


class Merger:
    def __init__(self, validated: ValidatedConfig, live: dict[str, torch.Tensor], seed: int = 0):
        source_names = validated.reference.tensors
        unknown = [n for n in live if n not in source_names]
        if unknown:
            raise ConfigError(
                f"live parameter {unknown[0]} has no tensor of that name in {validated.reference.path}: "
                "the models must be saved in the transformers layout"
            )
        self.live = [live[name] for name in live]
        self.names = list(live)
        # Sources are read one tensor at a time straight into the flat layout, so the
        # load's peak is what stays resident plus one tensor.
        self.flat = FlatSources.allocate(
            [source_names[name].shape for name in self.names], self.names, len(validated.models),
            with_base=validated.base is not None, dtype=torch.bfloat16, device=self.live[0].device)
        index = {name: j for j, name in enumerate(self.names)}
        for m, info in [*enumerate(validated.models), (None, validated.base)]:
            if info is None:
                continue
            for name, tensor in iter_tensors(info, self.names, dtype=torch.bfloat16):
                self.flat.write(m, index[name], tensor)
        self.seed = seed

    @torch.no_grad()
    def apply(self, recipe) -> None:
        table = build_table(recipe.method, self.flat, recipe_params(recipe, self.names),
                            normalize=recipe.normalize, rescale=recipe.rescale,
                            lambda_=recipe.lambda_, seed=self.seed)
        apply(self.flat, table, [p.data for p in self.live])
