"""Candidates per minute on the toy family: hotmerge (resident model) against an
on-disk loop doing what mergekit-evolve does per candidate (merge to disk with
mergekit, load the merged model, run lm-eval), side by side in one run, on the
same config, tasks, limit and candidates.

    .venv/bin/python bench/e2e.py --config configs/toy.yaml --candidates 12 [--backend vllm]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def candidates(genome, n: int, seed: int) -> list[np.ndarray]:
    """x0 and then CMA-ES's first samples around it (what a search evaluates first)."""
    from hotmerge.search.strategy import Search

    xs = [genome.x0()]
    search = Search(genome.x0(), 1 / 6, seed, max_fevals=n, popsize=max(2, n - 1))
    xs += search.ask()
    return xs[:n]


def run_hotmerge(validated, xs, backend: str) -> dict:
    from hotmerge.search.worker import CandidateWorker

    started = time.perf_counter()
    worker = CandidateWorker(validated, backend=backend)
    startup = time.perf_counter() - started
    worker.evaluate(xs[0])  # first call warms caches; not counted
    records, wall = [], time.perf_counter()
    for x in xs:
        t = time.perf_counter()
        result = worker.evaluate(x)
        result["seconds"]["wall"] = time.perf_counter() - t
        records.append(result)
    wall = time.perf_counter() - wall
    parts = {k: sum(r["seconds"].get(k, 0.0) for r in records) for k in ("apply", "forward", "metrics")}
    parts["coordination"] = sum(r["seconds"]["wall"] for r in records) - sum(parts.values())
    return {"startup_s": startup, "wall_s": wall, "per_candidate_s": wall / len(xs),
            "candidates_per_min": 60 * len(xs) / wall, "split_s": parts,
            "scores": [r["score"] for r in records]}


def run_on_disk(validated, xs, scratch: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from hotmerge.toy.evaluate import lm_eval_scores

    genome = validated.genome()
    tasks = validated.config.tasks
    scores, merge_s, eval_s = [], [], []
    wall = time.perf_counter()
    for i, x in enumerate(xs):
        out = scratch / f"candidate_{i}"
        t = time.perf_counter()
        config = MergeConfiguration.model_validate(genome.to_mergekit_config(x))
        run_merge(config, str(out), MergeOptions(copy_tokenizer=True, lazy_unpickle=False))
        merge_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        metrics = lm_eval_scores(out, [task.name for task in tasks])
        eval_s.append(time.perf_counter() - t)
        scores.append(sum(task.weight * metrics[task.name] for task in tasks))
        shutil.rmtree(out)
    wall = time.perf_counter() - wall
    return {"wall_s": wall, "per_candidate_s": wall / len(xs), "candidates_per_min": 60 * len(xs) / wall,
            "split_s": {"merge_to_disk": sum(merge_s), "load_and_evaluate": sum(eval_s)},
            "median_merge_s": statistics.median(merge_s), "median_load_and_eval_s": statistics.median(eval_s),
            "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/e2e.json")
    args = parser.parse_args()

    from hotmerge.config.evolve import load_config, validate_config
    from hotmerge.run.evolve import versions

    validated = validate_config(load_config(args.config))
    xs = candidates(validated.genome(), args.candidates, args.seed)
    hot = run_hotmerge(validated, xs, args.backend)
    with tempfile.TemporaryDirectory() as scratch:
        disk = run_on_disk(validated, xs, Path(scratch))
    ratio = hot["candidates_per_min"] / disk["candidates_per_min"]
    report = {"config": args.config, "candidates": len(xs), "backend": args.backend,
              "hotmerge": hot, "on_disk": disk, "speedup": ratio, "versions": versions()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"hotmerge ({args.backend}): {hot['candidates_per_min']:.1f} candidates/min "
          f"(startup {hot['startup_s']:.1f} s, not counted)")
    split = ", ".join(f"{k} {100 * v / hot['wall_s']:.0f}%" for k, v in hot["split_s"].items())
    print(f"  time split: {split}")
    print(f"on-disk loop (mergekit merge + load + lm-eval): {disk['candidates_per_min']:.1f} candidates/min "
          f"(merge {disk['median_merge_s']:.2f} s, load+eval {disk['median_load_and_eval_s']:.2f} s median)")
    print(f"speedup: {ratio:.1f}x   ->  {args.out}")


if __name__ == "__main__":
    main()
