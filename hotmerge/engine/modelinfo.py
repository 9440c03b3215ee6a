"""What a model folder holds, read from config.json and safetensors headers only.

No weights are loaded: a safetensors file starts with an 8-byte little-endian header
length and a JSON header mapping tensor names to dtype, shape and byte offsets.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hotmerge.engine.errors import ConfigError

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name: str) -> Optional[int]:
    """The N in `...layers.N....` (e.g. model.layers.3.mlp.up_proj.weight -> 3), else None."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: "BF16", "F16", "F32", ...
    file: str  # file name inside the model folder

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModelInfo:
    path: str
    config: dict
    architectures: list[str]
    model_type: Optional[str]
    num_layers: int
    tie_word_embeddings: bool
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @classmethod
    def from_path(cls, path) -> "ModelInfo":
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(
                f"model folder {path} does not exist: give the path of a local "
                "Hugging Face model folder (config.json + *.safetensors)"
            )
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ConfigError(
                f"{path} has no config.json: point to a Hugging Face model folder "
                "saved with save_pretrained()"
            )
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {config_file}: {e}: fix or re-save the model") from e
        if not isinstance(config, dict):
            raise ConfigError(f"{config_file} is not a JSON object: re-save the model")

        tensors = _read_tensor_index(folder)
        num_layers = _num_layers(config)
        if num_layers is None:
            raise ConfigError(
                f"{config_file} has no num_hidden_layers: only decoder models with a "
                "num_hidden_layers entry are supported"
            )
        tie = config.get("tie_word_embeddings")
        if tie is None:
            tie = config.get("text_config", {}).get("tie_word_embeddings")
        if tie is None:
            # transformers' own default is True; the weights tell the real story.
            tie = "lm_head.weight" not in tensors
        archs = config.get("architectures") or []
        return cls(
            path=str(folder),
            config=config,
            architectures=list(archs),
            model_type=config.get("model_type"),
            num_layers=num_layers,
            tie_word_embeddings=bool(tie),
            tensors=tensors,
        )

    def layer_tensors(self, layer: int) -> list[str]:
        return [n for n in self.tensors if layer_index(n) == layer]

    def non_layer_tensors(self) -> list[str]:
        return [n for n in self.tensors if layer_index(n) is None]


def _num_layers(config: dict) -> Optional[int]:
    for cfg in (config, config.get("text_config") or {}):
        n = cfg.get("num_hidden_layers")
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def _read_tensor_index(folder: Path) -> dict[str, TensorInfo]:
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"cannot read {index_file} ({e}): re-save the model with save_pretrained()"
            ) from e
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"{folder} has no *.safetensors files: re-save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        tensors.update(_read_header(folder / name))
    return tensors


def _read_header(file: Path) -> dict[str, TensorInfo]:
    if not file.is_file():
        raise ConfigError(f"{file} is missing: re-download or re-save the model")
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ConfigError(f"{file} is not a valid safetensors file ({e}): re-save the model") from e
    out = {}
    for tname, meta in header.items():
        if tname == "__metadata__":
            continue
        out[tname] = TensorInfo(shape=tuple(meta["shape"]), dtype=meta["dtype"], file=file.name)
    return out
