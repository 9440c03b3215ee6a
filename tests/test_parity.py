"""Whole-model parity with mergekit 0.1.5: the config hotmerge writes, merged by mergekit,
equals hotmerge's own merge of the same genotype, tensor by tensor."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hotmerge.config.evolve import parse_config, validate_config
from hotmerge.runtimes.merger import Merger
from parity import ambiguous_elements as ambiguous

# mergekit rounds to bf16 after every step; hotmerge keeps float32 and rounds once.
# So an element may differ by a few bf16 ulps of the result (ulp = 2^-7 relative),
# plus a few ulps of the terms mergekit sums (see intermediate_rounding).
ULPS = 4


def mergekit_merge(merge_config: dict, out) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(merge_config), str(out),
              MergeOptions(copy_tokenizer=False, lazy_unpickle=False, random_seed=0))
    return load_file(str(out / "model.safetensors"))


def hotmerge_merge(validated, x) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(validated.reference.path, dtype=torch.bfloat16)
    live = dict(model.named_parameters())
    Merger(validated, live, seed=0).apply(validated.genome().decode(x))
    return {name: p.detach() for name, p in live.items()}


def genome_case(family, **genome):
    data = {
        "genome": {
            "models": [str(p) for p in family.experts],
            "base_model": str(family.base),
            **genome,
        },
        "tasks": ["toy_sum_mc_search"],
    }
    return validate_config(parse_config(data))


DETERMINISTIC = [
    dict(merge_method="task_arithmetic", layer_granularity=0),
    dict(merge_method="task_arithmetic", layer_granularity=2, filters=["self_attn", "mlp"]),
    dict(merge_method="task_arithmetic", layer_granularity=1, smooth=True, allow_negative_weights=True),
    dict(merge_method="ties", layer_granularity=2),
    dict(merge_method="ties", layer_granularity=1, normalize=False, filters=["q_proj"]),
    dict(merge_method="ties", layer_granularity=2, smooth=True),
    dict(merge_method="linear", layer_granularity=2),
    dict(merge_method="linear", layer_granularity=1, smooth=True, normalize=False),
    dict(merge_method="slerp", layer_granularity=2),
    dict(merge_method="slerp", layer_granularity=0),
    dict(merge_method="breadcrumbs", layer_granularity=2),
    dict(merge_method="breadcrumbs_ties", layer_granularity=0, filters=["mlp"]),
]


def _ids(case):
    return "-".join(f"{k}={v}" for k, v in case.items() if k != "merge_method").replace(" ", "") or "default"


@pytest.mark.parametrize("case", DETERMINISTIC, ids=lambda c: c["merge_method"] + ":" + _ids(c))
def test_deterministic_methods_equal_mergekit(toy_family, tmp_path, case):
    genome = dict(case)
    if genome["merge_method"] in ("linear", "slerp"):
        # No separate base here: mergekit cannot merge linear/slerp with an unlisted base.
        models = [toy_family.base, *toy_family.experts]
        validated = validate_config(parse_config({
            "genome": {"models": [str(p) for p in models], **genome}, "tasks": ["toy_sum_mc_search"]}))
    else:
        validated = genome_case(toy_family, **genome)
    g = validated.genome()
    rng = np.random.default_rng(len(str(case)))
    x = rng.uniform(-1.0, 1.0, g.size) if genome.get("allow_negative_weights") else rng.uniform(0.05, 1.0, g.size)
    theirs = mergekit_merge(g.to_mergekit_config(x), tmp_path / "mergekit")
    ours = hotmerge_merge(validated, x)
    assert set(ours) <= set(theirs)
    recipe = validated.genome().decode(x)
    mismatched = 0
    for name, a in ours.items():
        b = theirs[name]
        a32, b32 = a.float(), b.float()
        ulp = torch.maximum(b32.abs(), a32.abs()) * 2.0 ** -7
        bad = (a32 - b32).abs() > ULPS * ulp + intermediate_rounding(validated, name, b32)
        bad &= ~ambiguous_elements(validated, recipe, name)
        mismatched += int(bad.sum())
    assert mismatched == 0, f"{mismatched} elements differ beyond {ULPS} ulps away from magnitude cuts"


def intermediate_rounding(validated, name: str, theirs: torch.Tensor) -> torch.Tensor:
    """What mergekit's bf16 intermediates may add: a few ulps of the terms it sums
    (the deltas), which can be much larger than the result where they cancel."""
    genome = validated.config.genome
    if genome.base_model is None:
        return 1e-3 * theirs.abs().max()
    base = _tensor(genome.base_model, name).float()
    deltas = sum((_tensor(p, name).float() - base).abs() for p in genome.models)
    return 2.0 ** -6 * deltas


def ambiguous_elements(validated, recipe, name: str) -> torch.Tensor:
    genome = validated.config.genome
    base = _tensor(genome.base_model, name) if genome.base_model else None
    return ambiguous(recipe.method, recipe.tensor(name).params if recipe.method != "slerp" else {}, base,
                     [_tensor(p, name) for p in genome.models])


_TENSORS: dict = {}


def _tensor(path: str, name: str) -> torch.Tensor:
    if path not in _TENSORS:
        _TENSORS[path] = load_file(f"{path}/model.safetensors")
    return _TENSORS[path][name]


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "slerp"])
def test_other_architecture_with_biases_and_tied_embeddings(tmp_path, method):
    """Qwen2 layout: attention biases and tied input/output embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=96, tie_word_embeddings=True)
    base = Qwen2ForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    paths = []
    for i in range(3):
        with torch.no_grad():
            variant = Qwen2ForCausalLM(config).to(torch.bfloat16)
            variant.load_state_dict(base.state_dict())
            for p in variant.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        variant.save_pretrained(tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    genome = {"models": paths, "merge_method": method, "layer_granularity": 2}
    if method == "slerp":
        genome["models"] = [str(tmp_path / "base"), *paths]
    else:
        genome["base_model"] = str(tmp_path / "base")
    validated = validate_config(parse_config({"genome": genome, "tasks": ["toy_sum_mc_search"]}))
    assert any("bias" in name for name in validated.reference.tensors)
    g = validated.genome()
    x = np.random.default_rng(7).uniform(0.1, 1.0, g.size)
    theirs = mergekit_merge(g.to_mergekit_config(x), tmp_path / "mergekit")
    ours = hotmerge_merge(validated, x)
    recipe = g.decode(x)
    assert set(ours) <= set(theirs)
    for name, a in ours.items():
        b = theirs[name].float()
        tolerance = ULPS * torch.maximum(a.float().abs(), b.abs()) * 2.0 ** -7 + intermediate_rounding(
            validated, name, b)
        bad = ((a.float() - b).abs() > tolerance) & ~ambiguous_elements(validated, recipe, name)
        assert not bad.any(), (name, int(bad.sum()))
