"""Start-up time of a worker with a cold and a warm statistics cache (kernels/stats_cache.py).

Each measurement is a fresh process that starts a CandidateWorker (transformers runtime:
the live model, the resident sources, the lm-eval requests) on a smol family, then gets
the load-time statistics (computed, or loaded from the cache; timed alone, as the first
candidate's table would), then writes its first candidate (mergekit-evolve's x0). Cold
and warm starts alternate, each cold one with an empty cache folder and the warm one
after it reusing that folder.

    python bench/startup_time.py [--family .cache/smol] [--methods task_arithmetic della]
                                 [--repeats 2] [--out bench/results/startup_cache.json]

--family: a `hotmerge toy build --family smol` folder (`make demo-smol`: .cache/smol) or the
tests' smaller variant (.cache/smol-test, two experts); the first that exists by default.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ["smol_capital_gen_search", "smol_color_gen_search", "smol_job_gen_search"]


def family_models(root: Path) -> tuple[Path, list[Path]]:
    """(base, experts) of a smol family folder: the demo's, or the tests' (experts-v*/)."""
    experts = sorted(root.glob("expert_*")) or sorted(root.glob("experts-v*/expert_*"))
    if not (root / "base").is_dir() or not experts:
        raise SystemExit(f"{root} holds no smol family: run `make demo-smol`, or the tests' smol_family fixture")
    return root / "base", experts


def measure(root: Path, method: str, cache: Path) -> dict:
    """In this process: start a worker with `cache` as the statistics cache, write x0."""
    started = time.perf_counter()
    from hotmerge.config.evolve import parse_config, validate_config
    from hotmerge.kernels import stats_cache
    from hotmerge.kernels.methods import get_method
    from hotmerge.search.worker import CandidateWorker

    imported = time.perf_counter()
    base, experts = family_models(root)
    genome = {"models": [str(p) for p in experts], "merge_method": method, "layer_granularity": 0}
    if method != "slerp":
        genome["base_model"] = str(base)
    validated = validate_config(parse_config({
        "genome": genome, "tasks": [{"name": t, "metric": "exact_match,none"} for t in TASKS], "limit": 40,
        "apply_chat_template": False, "fewshot_as_multiturn": False}))
    stats_cache.use_folder(cache)
    t0 = time.perf_counter()
    worker = CandidateWorker(validated, backend="hf", device="cpu")
    t1 = time.perf_counter()
    # What the first candidate's build_table does first, timed on its own.
    flat, spec = worker.runtime.merger.flat, get_method(method)
    flat.ensure_stats(della=spec.needs_rank_codes, slerp=spec.needs_slerp_constants)
    t2 = time.perf_counter()
    worker.runtime.apply(worker.genome.decode(worker.genome.x0()))
    t3 = time.perf_counter()
    return {"imports_s": imported - started, "worker_s": t1 - t0, "stats_s": t2 - t1, "first_apply_s": t3 - t2,
            "startup_s": t3 - t0, "stats_loaded": flat.stats_cache.loaded,
            "parameters": int(flat.total), "models": int(flat.n_models),
            "cache_bytes": sum(p.stat().st_size for p in cache.glob("*.safetensors"))}


def _run(root: Path, method: str, cache: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--measure", str(root), method, str(cache)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "della"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        root, method, cache = args.measure
        print(json.dumps(measure(Path(root), method, Path(cache))))
        return
    root = args.family or next((p for p in (REPO / ".cache/smol", REPO / ".cache/smol-test") if p.is_dir()), None)
    if root is None:
        raise SystemExit("no smol family in .cache: run `make demo-smol`, or pass --family")
    import torch

    result = {"family": str(root), "cpu": cpu_name(), "threads": torch.get_num_threads(), "methods": {}}
    for method in args.methods:
        runs = {"cold": [], "warm": []}
        for _ in range(args.repeats):
            cache = Path(tempfile.mkdtemp(prefix="hotmerge-stats-"))
            try:
                runs["cold"].append(_run(root, method, cache))
                runs["warm"].append(_run(root, method, cache))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        assert not any(r["stats_loaded"] for r in runs["cold"]) and all(r["stats_loaded"] for r in runs["warm"])
        median = {kind: {key: statistics.median(r[key] for r in rs)
                         for key in ("worker_s", "stats_s", "first_apply_s", "startup_s")}
                  for kind, rs in runs.items()}
        result["methods"][method] = {"runs": runs, "median": median}
        cold, warm = median["cold"], median["warm"]
        print(f"{method}: start-up to the first candidate written {cold['startup_s']:.1f} s cold, "
              f"{warm['startup_s']:.1f} s warm; statistics {cold['stats_s']:.2f} s computed, "
              f"{warm['stats_s']:.2f} s loaded ({runs['warm'][0]['cache_bytes'] / 2**20:.1f} MiB on disk); "
              f"worker {cold['worker_s']:.1f} / {warm['worker_s']:.1f} s, first merge "
              f"{cold['first_apply_s']:.1f} / {warm['first_apply_s']:.1f} s (medians of {args.repeats})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
