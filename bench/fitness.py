"""Racing against full evaluation, side by side in one process, at the same seeds.

For each seed, one search scores every candidate on every search item (full) and one
races (search/racing.py); both use the same resident model, config and CMA-ES settings.
Per mode: documents and requests scored per generation (forward work), wall time, and
the held-out score of the final best (the best search score's recipe scored on the
held-out tasks). For racing, every candidate stopped early is then scored fully, which
gives each generation's true best μ: a generation counts as a *wrong stop* when a
candidate stopped as outside the best μ belongs to it.

    .venv/bin/python bench/fitness.py --config configs/toy.yaml --heldout-tasks \
        toy_capital_mc_heldout,toy_color_mc_heldout,toy_sum_mc_heldout --seeds 0 1 2 --fevals 160
    .venv/bin/python bench/fitness.py --config configs/smol.yaml --limit all --heldout-tasks \
        smol_capital_gen_heldout,smol_color_gen_heldout,smol_job_gen_heldout --seeds 0 1 2 --fevals 32 \
        --out bench/results/fitness_smol.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def requests_per_document(suite) -> dict[str, float]:
    """task -> lm-eval requests per document (a multiple-choice item asks one per choice)."""
    counts = {}
    for name, task in suite.tasks.items():
        counts[name] = len(task.instances) / max(1, len(suite.docs[name]))
    return counts


def search(worker, config, *, seed: int, fevals: int, popsize: int, racing, run_dir: Path) -> dict:
    from hotmerge.run.storage import RunDir, best_record
    from hotmerge.search.coordinator import Coordinator, Fitness
    from hotmerge.search.strategy import Search

    genome = worker.genome
    run = RunDir(run_dir)
    run.path.mkdir(parents=True)
    strategy = Search(genome.x0(), 1 / 6, seed, fevals, popsize)
    fitness = Fitness(racing=racing, specs=tuple((t.name, t.metric, t.weight) for t in config.tasks))
    coordinator = Coordinator(run, strategy, worker, fevals, lambda record: None, genotype_size=genome.size,
                              log=lambda *_: None, fitness=fitness)
    started = time.perf_counter()
    coordinator.run_loop()
    wall = time.perf_counter() - started
    records = run.records()
    best = best_record(records)
    heldout = worker.evaluate_heldout(np.asarray(best["genotype"]))
    return {"wall_s": wall, "records": records, "best_score": best["score"],
            "heldout_score": heldout["heldout_score"], "heldout_stderr": heldout["heldout_stderr"],
            "generations": coordinator.search.generation, "mu": coordinator.search.mu}


def forward_work(records, suite, racing: bool) -> dict:
    """Documents and requests scored per generation."""
    per_doc = requests_per_document(suite)
    counts = suite.doc_counts
    total_docs = sum(counts.values())
    full_requests = sum(per_doc[t] * counts[t] for t in counts)
    by_generation: dict[int, list[float]] = {}
    for r in records:
        docs = r.get("items", total_docs) if racing else total_docs
        # racing scores every task's share alike: requests in proportion to documents
        by_generation.setdefault(r["generation"], []).append(docs)
    docs = [sum(v) for v in by_generation.values()]
    return {"documents_per_generation": statistics.mean(docs),
            "requests_per_generation": statistics.mean(docs) * full_requests / total_docs}


def wrong_stops(worker, records, mu: int) -> dict:
    """Score the stopped candidates fully; count generations where a candidate stopped as
    outside the best μ is in the true best μ."""
    by_generation: dict[int, list[dict]] = {}
    for r in records:
        by_generation.setdefault(r["generation"], []).append(r)
    wrong, outside, checked = 0, 0, 0
    for generation, rs in sorted(by_generation.items()):
        full = {}
        for r in rs:
            if r.get("score") is None:
                continue
            full[r["index"]] = (worker.evaluate(np.asarray(r["genotype"]))["score"] if r.get("stopped_early")
                                else r["score"])
        top = {i for i, _ in sorted(full.items(), key=lambda kv: (-kv[1], kv[0]))[:mu]}
        stopped_out = {r["index"] for r in rs if r.get("race") == "outside"}
        outside += len(stopped_out)
        wrong += bool(stopped_out & top)
        checked += 1
    return {"generations": checked, "wrong_stop_generations": wrong, "stopped_outside": outside,
            "wrong_stop_share": wrong / checked if checked else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--heldout-tasks", required=True, help="comma-separated held-out task names")
    parser.add_argument("--heldout-metric", default=None, help="their metric (default: the first search task's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fevals", type=int, default=160)
    parser.add_argument("--popsize", type=int, default=16)
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--delta", type=float, default=None, help="racing.delta (default: the config's)")
    parser.add_argument("--limit", default=None,
                        help="items per search task: a number, or 'all' (default: the config's limit)")
    parser.add_argument("--out", default="bench/results/fitness_toy.json")
    args = parser.parse_args()

    from hotmerge.config.evolve import RacingConfig, TaskConfig, load_config, validate_config
    from hotmerge.search.worker import CandidateWorker

    cfg = load_config(args.config)
    racing = cfg.racing or RacingConfig()
    if args.delta is not None:
        racing = racing.model_copy(update={"delta": args.delta})
    metric = args.heldout_metric or cfg.tasks[0].metric
    heldout = [TaskConfig(name=t, metric=metric) for t in args.heldout_tasks.split(",")]
    update = {"racing": racing, "heldout_tasks": heldout}
    if args.limit is not None:
        update["limit"] = None if args.limit == "all" else int(args.limit)
    cfg = cfg.model_copy(update=update)
    validated = validate_config(cfg)
    worker = CandidateWorker(validated, backend=args.backend, seed=0)
    results = {"config": args.config, "seeds": args.seeds, "fevals": args.fevals, "popsize": args.popsize,
               "racing": racing.model_dump(), "backend": args.backend, "machine": platform.processor() or
               platform.machine(), "search_documents": sum(worker.suite.doc_counts.values()), "runs": []}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for mode in ("full", "racing"):
                out = search(worker, cfg, seed=seed, fevals=args.fevals, popsize=args.popsize,
                             racing=racing if mode == "racing" else None, run_dir=Path(scratch) / f"{mode}-{seed}")
                row = {"seed": seed, "mode": mode, "wall_s": out["wall_s"], "best_score": out["best_score"],
                       "heldout_score": out["heldout_score"], "heldout_stderr": out["heldout_stderr"],
                       "generations": out["generations"],
                       **forward_work(out["records"], worker.suite, mode == "racing")}
                if mode == "racing":
                    row.update(wrong_stops(worker, out["records"], out["mu"]))
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    worker.close()

    summary = {}
    for mode in ("full", "racing"):
        rows = [r for r in results["runs"] if r["mode"] == mode]
        summary[mode] = {k: statistics.mean(r[k] for r in rows)
                         for k in ("wall_s", "documents_per_generation", "requests_per_generation",
                                   "heldout_score", "heldout_stderr")}
    summary["forward_saving"] = (summary["full"]["requests_per_generation"]
                                 / summary["racing"]["requests_per_generation"])
    summary["wall_saving"] = summary["full"]["wall_s"] / summary["racing"]["wall_s"]
    rows = [r for r in results["runs"] if r["mode"] == "racing"]
    summary["wrong_stop_share"] = (sum(r["wrong_stop_generations"] for r in rows)
                                   / max(1, sum(r["generations"] for r in rows)))
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
