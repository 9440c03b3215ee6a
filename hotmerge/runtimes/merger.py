"""Apply a decoded recipe to the live weights of an in-process (transformers) model.

The sources are packed once into the fused engine's flat layout (one segment per
live tensor); per candidate, the recipe becomes a small coefficient table and one
fused pass writes every live tensor in place. A candidate that would produce
non-finite values raises before anything is written.
"""

from __future__ import annotations

import math

import torch

from hotmerge.config.evolve import ValidatedConfig
from hotmerge.runtimes.encoding import RecipeRows
from hotmerge.errors import ConfigError, SetupError
from hotmerge.models.folder import is_derived_buffer, iter_tensors, sources_identity
from hotmerge.models.plan import choose_sources
from hotmerge.models.vocab import alignment_spec
from hotmerge.kernels import FlatSources, apply, build_table
from hotmerge.kernels.stats_cache import StatsCache


class Merger:
    def __init__(self, validated: ValidatedConfig, live: dict[str, torch.Tensor], seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16, stats_cache=None, sources: str = "auto"):
        """stats_cache: a folder that keeps the load-time statistics between runs (None: none).
        sources: device, pinned or auto (models/plan.py choose_sources); self.sources says
        which was chosen and why."""
        source_names = validated.reference.tensors
        unknown = [n for n in live if n not in source_names]
        if unknown:
            raise ConfigError(
                f"live parameter {unknown[0]} has no tensor of that name in {validated.reference.path}: "
                "the models must be saved in the transformers layout"
            )
        # Every source tensor must be written: one with no live parameter would score
        # (and export) as the reference's unmerged value. A tied lm_head is the embedding.
        tied = {"lm_head.weight"} if validated.reference.tie_word_embeddings else set()
        unmerged = [n for n in source_names if n not in live and n not in tied and not is_derived_buffer(n)]
        if unmerged:
            raise SetupError(
                f"tensor {unmerged[0]} of {validated.reference.path} has no parameter in the model transformers "
                f"builds from its config.json ({len(unmerged)} such tensors), so it would stay unmerged: fix the "
                "checkpoint or its config.json")
        self.live = [live[name] for name in live]
        self.names = list(live)
        # Sources are read one tensor at a time straight into the flat layout, so the
        # load's peak is what stays resident plus one tensor.
        shapes = [source_names[name].shape for name in self.names]
        device = self.live[0].device
        n_buffers = len(validated.models) + (validated.base is not None)
        one = dtype.itemsize * sum(math.prod(shape) for shape in shapes)  # one model's tensors
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        self.sources = choose_sources(sources, resident_bytes=n_buffers * one, free_bytes=free, device=str(device),
                                      base_bytes=one if validated.base is not None else 0)
        pinned = self.sources.placement == "pinned"
        self.flat = FlatSources.allocate(
            shapes, self.names, len(validated.models), with_base=validated.base is not None, dtype=dtype,
            device="cpu" if pinned else device, pin_memory=pinned and device.type == "cuda")
        if pinned:
            self.flat.stream_to(device, base_on_device=self.sources.base_on_device)
        index = {name: j for j, name in enumerate(self.names)}
        for m, info in [*enumerate(validated.models), (None, validated.base)]:
            if info is None:
                continue
            for name, tensor in iter_tensors(info, self.names, dtype=dtype):
                self.flat.write(m, index[name], tensor)
        if stats_cache is not None:
            sources = sources_identity([info.reference for info in validated.models],
                                       validated.base.reference if validated.base is not None else None,
                                       alignment_spec(validated.reference))
            self.flat.stats_cache = StatsCache(stats_cache, {"runtime": "transformers", **sources})
        self.seed = seed

    @torch.no_grad()
    def apply(self, recipe) -> None:
        self.apply_rows(RecipeRows.encode(recipe, self.names))

    @torch.no_grad()
    def apply_rows(self, encoded: RecipeRows) -> None:
        table = build_table(encoded.method, self.flat, encoded.per_segment(), normalize=encoded.normalize,
                            rescale=encoded.rescale, lambda_=encoded.lambda_, seed=self.seed)
        apply(self.flat, table, [p.data for p in self.live])
