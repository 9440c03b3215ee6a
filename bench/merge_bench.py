"""Merge throughput against the memory-bandwidth floor (DESIGN.md §4).

For synthetic Llama-like shapes, every method's apply (one candidate written into
the output) is timed and compared with the floor: the bytes a merge must move
(every source read once, the base read once where the method uses it, the output
written once) at the copy bandwidth measured in the same run.

    .venv/bin/hotmerge bench merge --preset 1b --layers 4 --models 3
    .venv/bin/python bench/merge_bench.py --preset toy
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hotmerge.kernels.methods import METHODS as REGISTRY

METHODS = list(REGISTRY)


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_dim: int


PRESETS = {
    "toy": Shape(hidden=128, intermediate=256, layers=4, vocab=256, kv_dim=128),
    "1b": Shape(hidden=2048, intermediate=8192, layers=16, vocab=128256, kv_dim=512),  # Llama-3.2-1B
    "3b": Shape(hidden=3072, intermediate=8192, layers=28, vocab=128256, kv_dim=1024),  # Llama-3.2-3B
    "7b": Shape(hidden=4096, intermediate=11008, layers=32, vocab=32000, kv_dim=4096),  # Llama-2-7B
    "8b": Shape(hidden=4096, intermediate=14336, layers=32, vocab=128256, kv_dim=1024),  # Llama-3-8B
}


def tensor_shapes(shape: Shape, layers: int, embeddings: bool) -> list[tuple[str, tuple[int, ...]]]:
    h, i = shape.hidden, shape.intermediate
    out = [("model.embed_tokens.weight", (shape.vocab, h))] if embeddings else []
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (shape.kv_dim, h)),
                (p + "self_attn.v_proj.weight", (shape.kv_dim, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if embeddings:
        out.append(("lm_head.weight", (shape.vocab, h)))
    return out


def synthetic_sources(shapes, n_models: int, dtype, device, seed: int = 0):
    """A base with N fine-tune-like variants (deltas ~2% of the weights' scale)."""
    from hotmerge.kernels import FlatSources

    gen = torch.Generator(device="cpu").manual_seed(seed)
    base, models = [], [[] for _ in range(n_models)]
    for _, dims in shapes:
        b = torch.randn(dims, generator=gen) * 0.02
        base.append(b.to(dtype))
        for m in range(n_models):
            models[m].append((b + torch.randn(dims, generator=gen) * 4e-4).to(dtype))
    names = [name for name, _ in shapes]
    return FlatSources.from_tensors(models, base, names, device=device, dtype=dtype)


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats: int) -> float:
        """Median seconds of fn() over repeats (after one warm-up call)."""
        fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


# A candidate's genes, drawn where a search would put them.
GENE_RANGES = {"weight": (0.2, 1.0), "density": (0.3, 0.7), "select_topk": (0.3, 0.8), "t": (1e-4, 1e-2),
               "r": (0.05, 0.5), "alpha": (0.1, 1.0)}


def candidate_params(method: str, n_segments: int, n_models: int, rng: np.random.Generator) -> dict:
    if method == "slerp":
        return {"t": rng.uniform(0.1, 0.5, n_segments), "pair": np.array([0, 1])}
    spec = REGISTRY[method]
    params = {gene: rng.uniform(*GENE_RANGES[gene], (n_segments, n_models)) for gene in spec.genes}
    inputs = active_inputs(method, n_models)
    if inputs < n_models:  # the first models, as many as the method takes (nuslerp 2, nearswap 1, ...)
        params["active"] = np.array([1.0] * inputs + [0.0] * (n_models - inputs))
    return params


def active_inputs(method: str, n_models: int) -> int:
    """How many of the models besides the base a tensor of `method` merges here: all, or the
    most its input contract takes (the base counts as an input where the method takes it)."""
    if method == "slerp":
        return 2
    spec = REGISTRY[method]
    _, most = spec.contract.non_base_range(spec.takes_base)
    return n_models if most is None else min(most, n_models)


def host_sources(flat, device: torch.device):
    """The same sources in host memory (page-locked beside a GPU), streamed to `device`; on a
    GPU the base stays there, as the runtimes keep it where it fits (models/plan.py)."""
    from hotmerge.kernels import FlatSources

    pin = device.type == "cuda"

    def host(t):
        t = t.cpu()
        return t.pin_memory() if pin else t.clone()

    return FlatSources(host(flat.models), flat.segments, None if flat.base is None else host(flat.base),
                       flat.model_keys).stream_to(device, base_on_device=pin)


def run(preset: str, layers: int | None, n_models: int, dtype_name: str, methods: list[str],
        device_name: str | None, repeats: int, embeddings: bool, sources: str = "device") -> dict:
    """sources: device (resident beside the output), pinned (host memory, streamed), or both
    side by side (each method's pinned time against its resident time in the same run)."""
    from hotmerge.kernels import apply, build_table

    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    shape = PRESETS[preset]
    n_layers = min(layers or shape.layers, shape.layers)
    build_on = device if sources != "pinned" else torch.device("cpu")
    flat = synthetic_sources(tensor_shapes(shape, n_layers, embeddings), n_models, dtype, build_on)
    host = host_sources(flat, device) if sources != "device" else None
    resident = flat if sources != "pinned" else None
    total = flat.total
    elem = flat.models.element_size()
    out = torch.empty(total, dtype=dtype, device=device)
    timer = Timer(device)

    # Copy bandwidth, measured on a buffer the size of the merged model; with host sources,
    # also the host link (host buffer to device).
    src = flat.models[0] if resident is not None else out.clone()
    copy_s = timer(lambda: out.copy_(src), repeats)
    copy_bw = 2 * total * elem / copy_s
    link_bw = None
    if host is not None:
        link_s = timer(lambda: out.copy_(host.models[0], non_blocking=True), repeats)
        link_bw = total * elem / link_s

    rng = np.random.default_rng(0)
    rows = []
    for method in methods:
        params = candidate_params(method, len(flat.segments), n_models, rng)
        reads = active_inputs(method, n_models) + (1 if REGISTRY[method].takes_base else 0)
        moved = (reads + 1) * total * elem
        row = {"method": method, "bytes_moved": moved}
        if resident is not None:
            started = time.perf_counter()
            build_table(method, flat, params, normalize=True)  # first build computes the statistics
            stats_s = time.perf_counter() - started
            started = time.perf_counter()
            table = build_table(method, flat, params, normalize=True)
            table_s = time.perf_counter() - started
            apply_s = timer(lambda: apply(flat, table, out), repeats)
            floor_s = moved / copy_bw
            row.update({"apply_s": apply_s, "table_s": table_s, "stats_once_s": stats_s,
                        "achieved_GBps": moved / apply_s / 1e9,
                        "floor_s": floor_s, "ratio_to_floor": apply_s / floor_s})
        if host is not None:
            started = time.perf_counter()
            build_table(method, host, params, normalize=True)
            row["pinned_stats_once_s"] = time.perf_counter() - started
            table = build_table(method, host, params, normalize=True)
            pinned_s = timer(lambda: apply(host, table, out), repeats)
            base_stays = host.device_base is not None and REGISTRY[method].takes_base
            streamed = (reads - base_stays) * total * elem  # what crosses the host link
            link_floor_s = streamed / link_bw
            row.update({"pinned_apply_s": pinned_s, "link_bytes": streamed, "link_floor_s": link_floor_s,
                        "pinned_to_link_floor": pinned_s / link_floor_s})
            if resident is not None:
                row["pinned_to_resident"] = pinned_s / row["apply_s"]
        rows.append(row)
    if device.type == "cuda":
        name, kernel = torch.cuda.get_device_name(device), "triton"
    else:
        from hotmerge.kernels import cpu_native

        name = f"cpu ({cpu_model()})"
        kernel = "native C kernel + torch" if cpu_native.available() else "torch"
    return {"preset": preset, "layers": n_layers, "embeddings": embeddings, "parameters": total,
            "models": n_models, "dtype": dtype_name, "device": name, "kernel": kernel,
            "threads": torch.get_num_threads(), "sources": sources,
            "chunk": host.streamed if host is not None else None,
            "repeats": repeats, "copy_GBps": copy_bw / 1e9,
            "link_GBps": None if link_bw is None else link_bw / 1e9, "rows": rows}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else "unknown model"


def print_report(report: dict) -> None:
    print(f"{report['preset']} ({report['layers']} layers, {report['parameters'] / 1e6:.1f}M parameters), "
          f"{report['models']} models, {report['dtype']}, {report['device']}, {report.get('kernel')}; "
          f"copy bandwidth {report['copy_GBps']:.1f} GB/s")
    if report.get("sources", "device") != "device":
        print(f"sources in host memory, streamed in chunks of {report['chunk']} elements; host link "
              f"{report['link_GBps']:.1f} GB/s")
        print(f"{'method':18s} {'device ms':>10s} {'pinned ms':>10s} {'x device':>9s} {'link floor ms':>14s} "
              f"{'x link floor':>13s}")
        for r in report["rows"]:
            dev = f"{1e3 * r['apply_s']:10.2f}" if "apply_s" in r else f"{'-':>10s}"
            ratio = f"{r['pinned_to_resident']:9.2f}" if "pinned_to_resident" in r else f"{'-':>9s}"
            print(f"{r['method']:18s} {dev} {1e3 * r['pinned_apply_s']:10.2f} {ratio} "
                  f"{1e3 * r['link_floor_s']:14.2f} {r['pinned_to_link_floor']:13.2f}")
        return
    print(f"{'method':18s} {'apply ms':>10s} {'GB moved':>9s} {'GB/s':>7s} {'floor ms':>9s} {'x floor':>8s} {'table ms':>9s}")
    for r in report["rows"]:
        print(f"{r['method']:18s} {1e3 * r['apply_s']:10.2f} {r['bytes_moved'] / 1e9:9.3f} "
              f"{r['achieved_GBps']:7.1f} {1e3 * r['floor_s']:9.2f} {r['ratio_to_floor']:8.2f} "
              f"{1e3 * r['table_s']:9.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge throughput against the memory-bandwidth floor.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="toy")
    parser.add_argument("--layers", type=int, default=None, help="Cap the layer count (to fit memory).")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-embeddings", action="store_true", help="Leave out embed_tokens and lm_head.")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/merge_<preset>.json).")
    parser.add_argument("--sources", choices=["device", "pinned", "both"], default="device",
                        help="Where the sources live: beside the output (device), in host memory streamed "
                             "in chunks (pinned), or both timed side by side.")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}: use some of {', '.join(METHODS)}")
    if args.models < 2:
        parser.error("--models must be at least 2 (slerp merges two)")
    report = run(args.preset, args.layers, args.models, args.dtype, methods, args.device,
                 args.repeats, not args.no_embeddings, args.sources)
    print_report(report)
    out = Path(args.out or f"bench/results/merge_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
