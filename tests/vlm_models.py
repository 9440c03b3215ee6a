"""A tiny Llava family (vision tower, projector and language model) for the export tests.

transformers builds the base with random weights and saves it; its tensors are stored
under the names transformers loads natively (model.language_model.*, model.vision_tower.*,
model.multi_modal_projector.*, lm_head.*), which are also the names mergekit merges
every tensor of. The fine-tunes are the base plus small random changes. The vision
tower has more layers than the language model, so that a layer gradient shows which
module's layer count places a layer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _native_name(name: str) -> str:
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return name if name.startswith(("model.", "lm_head.")) else "model." + name


def llava_family(root: Path, n_experts: int = 3, text_layers: int = 2, vision_layers: int = 3) -> tuple:
    """(base folder, [expert folders]) under root, built once per root."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    base = root / "base"
    experts = [root / f"expert{i}" for i in range(n_experts)]
    if not (experts[-1] / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = LlavaConfig(
            text_config=LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=text_layers,
                                    num_attention_heads=2, num_key_value_heads=1, vocab_size=64),
            vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=vision_layers,
                                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16),
            image_token_index=63)
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
        model.save_pretrained(base)
        weights = {_native_name(n): t for n, t in load_file(str(base / "model.safetensors")).items()}
        save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
        (base / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor",
                                                                   "crop_size": 28, "size": 28}))
        g = torch.Generator().manual_seed(1)
        for expert in experts:
            expert.mkdir(parents=True, exist_ok=True)
            (expert / "config.json").write_text((base / "config.json").read_text())
            tuned = {n: (t.float() + 0.05 * t.float().abs().mean() * torch.randn(t.shape, generator=g)).bfloat16()
                     for n, t in weights.items()}
            save_file(tuned, str(expert / "model.safetensors"), metadata={"format": "pt"})
    return str(base), [str(e) for e in experts]
