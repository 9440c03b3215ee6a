"""Resident sources: the base and every model's tensors, loaded once, kept beside the live model.

Tensors are read from safetensors once, in the dtype the merge works in (bf16),
and placed on the live model's device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from hotmerge.engine.config import ValidatedConfig
from hotmerge.engine.errors import ConfigError


def _tensor_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out[name] = file
    return out


def load_tensors(folder: str | Path, names: list[str], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    where = _tensor_files(folder)
    missing = [n for n in names if n not in where]
    if missing:
        raise ConfigError(f"{folder} lacks tensor {missing[0]}: merge only models with the base's layout")
    out = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(where[name], []).append(name)
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in file_names:
                out[name] = f.get_tensor(name).to(dtype=dtype, device=device)
    return out


class ResidentSources:
    """Base (when the method has one) and model tensors for the given source tensor names."""

    def __init__(self, validated: ValidatedConfig, names: list[str], dtype=torch.bfloat16, device="cpu"):
        genome = validated.config.genome
        self.names = list(names)
        self.models = [load_tensors(p, self.names, dtype, device) for p in genome.models]
        self.base = (
            load_tensors(genome.base_model, self.names, dtype, device)
            if genome.base_model is not None
            else None
        )

    def nbytes(self) -> int:
        tables = self.models + ([self.base] if self.base is not None else [])
        return sum(t.numel() * t.element_size() for table in tables for t in table.values())
