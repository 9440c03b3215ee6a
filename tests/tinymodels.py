"""Tiny Llama model families for tests: a base and fine-tuned-like variants."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=64,
)


def make_llama_family(
    dir, n_models: int = 3, seed: int = 0, noise: float = 0.01, **config_overrides
) -> tuple[str, list[str]]:
    """Save `dir/base` and `dir/model_{i}` (base + small random perturbations) in bf16.

    Returns (base_path, [model_paths]) as strings. Only the weights differ between
    the models, as after fine-tuning; config_overrides go to LlamaConfig.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    dir = Path(dir)
    cfg = LlamaConfig(**{**TINY_LLAMA, **config_overrides})
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    base_path = dir / "base"
    model.save_pretrained(base_path, safe_serialization=True)

    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i in range(n_models):
        with torch.no_grad():
            for name, param in model.named_parameters():
                delta = torch.randn(param.shape, generator=gen) * noise
                param.copy_((base_state[name].float() + delta).to(param.dtype))
        path = dir / f"model_{i}"
        model.save_pretrained(path, safe_serialization=True)
        paths.append(str(path))
    return str(base_path), paths
