"""A long toy search in one process: resident memory and per-candidate time over
1,000 candidates (the goal: RSS after 1,000 within 5% of RSS after 50).

    .venv/bin/python bench/soak.py --config configs/toy.yaml --candidates 1000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args()

    from hotmerge.config.evolve import load_config, validate_config
    from hotmerge.run.evolve import versions
    from hotmerge.search.strategy import Search
    from hotmerge.search.worker import CandidateWorker

    validated = validate_config(load_config(args.config))
    genome = validated.genome()
    worker = CandidateWorker(validated, backend=args.backend, seed=args.seed)
    search = Search(genome.x0(), 1 / 6, args.seed, max_fevals=10**9)
    rss, seconds, failures = [], [], 0
    while len(seconds) < args.candidates:
        xs = search.ask()
        scores = []
        for x in xs:
            started = time.perf_counter()
            result = worker.evaluate(x)
            seconds.append(time.perf_counter() - started)
            rss.append(rss_bytes())
            failures += result["score"] is None
            scores.append(result["score"])
        search.tell(xs, scores)
    n = args.candidates
    at_50, at_end = rss[min(49, n - 1)], rss[n - 1]
    report = {
        "candidates": n, "backend": args.backend, "failures": failures,
        "rss_after_50_bytes": at_50, "rss_after_last_bytes": at_end, "rss_growth": at_end / at_50 - 1,
        "median_candidate_s_first_100": statistics.median(seconds[:100]),
        "median_candidate_s_last_100": statistics.median(seconds[max(0, n - 100):n]),
        "rss_every_50": rss[49:n:50], "versions": versions(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"RSS after 50: {at_50 / 2**20:.1f} MiB, after {n}: {at_end / 2**20:.1f} MiB "
          f"({100 * report['rss_growth']:+.2f}%); median s/candidate first 100 "
          f"{report['median_candidate_s_first_100']:.3f}, last 100 {report['median_candidate_s_last_100']:.3f}")


if __name__ == "__main__":
    main()
