"""One candidate as the kernels take it: distinct parameter rows plus a row per source tensor.

Both runtimes hand a recipe to the merge engine this way: the transformers runtime
in process, the vLLM runtime over its RPC to the worker that holds the model. A recipe
has a handful of distinct rows (one per layer group and filter set), so the payload
stays a few hundred numbers however many tensors the model has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RecipeRows:
    method: str
    normalize: bool
    rescale: bool
    lambda_: float
    index: np.ndarray  # [n_tensors] int: the row of each source tensor
    rows: dict  # per-model params [R, M] (weight, density, gamma, epsilon); slerp: t [R], pair [R, 2]

    @classmethod
    def encode(cls, recipe, names: list[str]) -> "RecipeRows":
        index = np.zeros(len(names), dtype=np.int64)
        seen: dict = {}
        if recipe.method == "slerp":
            for i, name in enumerate(names):
                tensor = recipe.tensor(name)
                index[i] = seen.setdefault((int(tensor.base), int(tensor.other), float(tensor.t)), len(seen))
            keys = list(seen)
            rows = {"t": np.array([k[2] for k in keys], dtype=np.float64),
                    "pair": np.array([[k[0], k[1]] for k in keys], dtype=np.int64).reshape(-1, 2)}
        else:
            param_names, values = None, []
            for i, name in enumerate(names):
                params = recipe.tensor(name).params
                if param_names is None:
                    param_names = sorted(params)
                key = tuple(np.concatenate([np.asarray(params[p], dtype=np.float64) for p in param_names]).tolist())
                if key not in seen:
                    seen[key] = len(seen)
                    values.append(key)
                index[i] = seen[key]
            m = len(recipe.models)
            stacked = np.array(values, dtype=np.float64).reshape(len(values), len(param_names), m)
            rows = {p: stacked[:, j, :] for j, p in enumerate(param_names)}
        return cls(method=recipe.method, normalize=bool(recipe.normalize), rescale=bool(recipe.rescale),
                   lambda_=float(recipe.lambda_), index=index, rows=rows)

    def per_segment(self, sources=None) -> dict:
        """{param: values per segment}; sources: each segment's source tensor (default: one each)."""
        rows = self.index if sources is None else self.index[np.asarray(sources)]
        return {key: value[rows] for key, value in self.rows.items()}
