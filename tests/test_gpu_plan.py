"""`hotmerge plan` for families that do not fit one GPU, planned from headers alone: the
safetensors headers are exact and the data regions are holes (sparse files)."""

import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hotmerge.cli import app, exit_code
from hotmerge.config.evolve import load_config, validate_config
from hotmerge.errors import ConfigError
from hotmerge.models.plan import DEVICE_MARGIN, GpuPlan, gpu_plan

GiB = 2 ** 30
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, num_local_experts=8, tie_word_embeddings=False)


def shapes(cfg: dict) -> dict:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        if "num_local_experts" in cfg:
            out[p + "block_sparse_moe.gate.weight"] = (cfg["num_local_experts"], h)
            for e in range(cfg["num_local_experts"]):
                q = f"{p}block_sparse_moe.experts.{e}."
                out.update({q + "w1.weight": (i, h), q + "w2.weight": (h, i), q + "w3.weight": (i, h)})
        else:
            out.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                        p + "mlp.down_proj.weight": (h, i)})
    return out


def header_only_model(folder: Path, cfg: dict, model_type: str, architecture: str) -> int:
    """A model folder whose safetensors header is exact and whose data is a hole; its parameters."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": model_type,
                                                    "architectures": [architecture], "torch_dtype": "bfloat16"}))
    header, offset = {}, 0
    for name, shape in shapes(cfg).items():
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: no weight is written
    return offset // 2


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("header_only")
    out = {}
    for name, cfg, mtype, arch in (("llama70b", LLAMA_70B, "llama", "LlamaForCausalLM"),
                                   ("mixtral", MIXTRAL, "mixtral", "MixtralForCausalLM")):
        params = 0
        for member in ("base", "a", "b", "c"):
            params = header_only_model(root / name / member, cfg, mtype, arch)
        config = root / f"{name}.yaml"
        config.write_text(
            "genome:\n  models:\n" + "".join(f"    - {root / name / m}\n" for m in "abc")
            + f"  merge_method: ties\n  base_model: {root / name / 'base'}\n  layer_granularity: 8\n"
            "tasks:\n  - name: toy_capital_mc_search\n    metric: acc,none\n")
        out[name] = (config, params)
    return out


def test_family_sizes_match_the_arithmetic(families):
    assert abs(families["llama70b"][1] - 70.55e9) / 70.55e9 < 0.01
    assert abs(families["mixtral"][1] - 46.70e9) / 46.70e9 < 0.01


def test_70b_at_tensor_parallel_8_chooses_pinned(families):
    config, params = families["llama70b"]
    validated = validate_config(load_config(config))
    p = gpu_plan(validated, gpus=8, gpu_memory=80 * GiB, tensor_parallel_size=8, sources="auto")
    assert isinstance(p, GpuPlan) and p.choice.placement == "pinned"
    shard = 2 * params / 8
    assert abs(p.live - shard) / shard < 0.01  # 17.6 GB of live weights per GPU
    assert abs(p.sources - 4 * shard) / (4 * shard) < 0.01  # base and three sources: 70.5 GB
    assert p.live + p.sources > 80 * GiB - DEVICE_MARGIN  # cannot sit on the device
    # the base stays on the GPU beside the live model (17.6 GB each); the three sources stream
    assert p.base_on_device and abs(p.base - shard) / shard < 0.01
    assert abs(p.used("pinned") - (2 * shard + p.staging + DEVICE_MARGIN)) < 1
    assert p.room("pinned") > 40 * GiB  # the KV cache's room with pinned sources
    assert abs(p.host_pinned - 8 * 3 * shard) / (8 * 3 * shard) < 0.01  # 423 GB of page-locked memory
    assert abs(p.floor_seconds("pinned") - 3 * shard / 50e9) < 0.02  # 52.9 GB per GPU: about 1 s
    with pytest.raises(ConfigError, match="--sources pinned"):
        gpu_plan(validated, gpus=8, gpu_memory=80 * GiB, tensor_parallel_size=8, sources="device")
    # at size 2 the live shard (35 GB) leaves no room for the base's: it streams with the sources
    p = gpu_plan(validated, gpus=2, gpu_memory=80 * GiB, tensor_parallel_size=2, sources="pinned")
    shard = 2 * params / 2
    assert not p.base_on_device and "stays" not in str(p.choice)
    assert abs(p.host_pinned - 2 * 4 * shard) / (2 * 4 * shard) < 0.01
    assert abs(p.floor_seconds("pinned") - 4 * shard / 50e9) < 0.05


def test_mixtral_plans_and_refusals(families):
    config, params = families["mixtral"]
    validated = validate_config(load_config(config))
    p = gpu_plan(validated, gpus=8, gpu_memory=80 * GiB, tensor_parallel_size=8, sources="device")
    assert p.choice.placement == "device" and abs(p.live - 2 * params / 8) / (2 * params / 8) < 0.01
    with pytest.raises(ConfigError, match="--tensor-parallel-size 8"):  # the smallest size that fits
        gpu_plan(validated, gpus=8, gpu_memory=80 * GiB, tensor_parallel_size=2, sources="device")
    with pytest.raises(ConfigError, match="more GPUs"):  # the live model alone does not fit
        gpu_plan(validated, gpus=1, gpu_memory=80 * GiB, tensor_parallel_size=1, sources="pinned")
    with pytest.raises(ConfigError, match="host memory"):
        gpu_plan(validated, gpus=8, gpu_memory=40 * GiB, tensor_parallel_size=8, sources="pinned",
                 host_memory=100 * GiB)


def test_plan_command_for_absent_gpus(families):
    config, _ = families["llama70b"]
    res = CliRunner().invoke(app, ["plan", str(config), "--device", "cuda", "--gpus", "8", "--gpu-memory", "80",
                                   "--tensor-parallel-size", "8"])
    assert res.exit_code == 0, res.output
    assert "pinned" in res.output and "host link" in res.output
    res = CliRunner().invoke(app, ["plan", str(config), "--device", "cuda", "--gpus", "8", "--gpu-memory", "80",
                                   "--tensor-parallel-size", "8", "--sources", "device"])
    assert exit_code(res.exception) == 2 and "use --sources pinned" in str(res.exception)


def test_pinned_keeps_the_base_on_the_device_where_it_fits():
    from hotmerge.models.plan import choose_sources

    one = 10 * GiB
    fits = choose_sources("auto", resident_bytes=4 * one, free_bytes=one + DEVICE_MARGIN, device="cuda:0",
                          base_bytes=one)
    assert fits.placement == "pinned" and fits.base_on_device and "the base (10.0 GiB) stays" in fits.reason
    tight = choose_sources("pinned", resident_bytes=4 * one, free_bytes=one, device="cuda:0", base_bytes=one)
    assert tight.placement == "pinned" and not tight.base_on_device
    unknown = choose_sources("pinned", resident_bytes=4 * one, free_bytes=None, device="cpu", base_bytes=one)
    assert not unknown.base_on_device  # nothing is known to fit
    assert not choose_sources("auto", resident_bytes=4 * one, free_bytes=8 * one, device="cuda:0",
                              base_bytes=one).base_on_device  # everything fits: device, nothing streams
