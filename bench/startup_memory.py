"""Start-up peak memory of the transformers runtime against what it keeps resident.

Builds a synthetic Llama family (a base and N fine-tunes, bf16 safetensors) in a
scratch folder, then, in a fresh process, loads the live model and the merge engine's
resident sources the way `HFRuntime` does and reports, above the process's memory
after its imports: the peak resident set during start-up, the resident set once
loaded, and the ratio of the peak to what it keeps (live model plus resident sources).

    python bench/startup_memory.py [--hidden 512 --layers 8 --models 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def build_family(root: Path, hidden: int, layers: int, n_models: int) -> list[str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    paths = []
    for i in range(n_models + 1):
        if i:
            with torch.no_grad():
                for p in base.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
        path = root / ("base" if i == 0 else f"m{i}")
        base.save_pretrained(path)
        paths.append(str(path))
    return paths


def measure(paths: list[str]) -> dict:
    """In this process: load as HFRuntime does, return the memory figures (bytes)."""
    import gc

    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from hotmerge.config.evolve import parse_config, validate_config
    from hotmerge.runtimes.merger import Merger

    validated = validate_config(parse_config({
        "genome": {"models": paths[1:], "base_model": paths[0], "merge_method": "ties"},
        "tasks": ["unused"]}))
    gc.collect()
    proc = psutil.Process()
    floor = proc.memory_info().rss
    model = AutoModelForCausalLM.from_pretrained(validated.reference.path, dtype=torch.bfloat16)
    merger = Merger(validated, dict(model.named_parameters()))
    gc.collect()
    resident = proc.memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    live = sum(p.numel() * p.element_size() for p in model.parameters())
    flat = merger.flat.models.numel() * 2 + (merger.flat.base.numel() * 2 if merger.flat.base is not None else 0)
    return {"floor_bytes": floor, "peak_above_floor": peak - floor,
            "resident_above_floor": resident - floor, "live_model_bytes": live, "sources_bytes": flat,
            # against the bytes it keeps (the live model's pages may be file-backed, under RSS)
            "ratio": (peak - floor) / max(1, live + flat, resident - floor)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_family(Path(tmp), args.hidden, args.layers, args.models)
        done = subprocess.run([sys.executable, __file__, "--measure", *paths], capture_output=True, text=True,
                              check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(hidden=args.hidden, layers=args.layers, models=args.models)
    mib = 1 << 20
    print(f"live model {result['live_model_bytes'] / mib:.0f} MiB, resident sources "
          f"{result['sources_bytes'] / mib:.0f} MiB; above the process floor: resident "
          f"{result['resident_above_floor'] / mib:.0f} MiB, start-up peak {result['peak_above_floor'] / mib:.0f} MiB "
          f"({result['ratio']:.2f}x)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
