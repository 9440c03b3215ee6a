"""Budget curves: the held-out quality a search reaches against the documents it scored, for
every fitness mode (full, racing, subsets, irt) at the same seeds, side by side in one
process with one resident model.

For each seed and mode, a search runs with the mode's fitness; full evaluation gets
--fevals evaluations, subsets and irt --fevals × --factor and racing × --racing-factor,
so that their curves reach about full's documents. After every generation, and after every
scoring of CMA-ES's mean (subsets, irt), two recipes are scored on the held-out tasks: the
chosen one (best_config.yaml's rule, storage.best_record: the best full score so far, or with
subsets the best of the means' scores) and CMA-ES's mean. Documents are the search's (each
record's `items`); held-out scoring is measurement and is not counted.

The summary: full evaluation's final held-out score at its budget D (mean over seeds, with
its standard error), and for every mode the fewest documents at which its mean curve of
the chosen recipe reaches that score less one standard error; the saving is D over that.

    .venv/bin/hotmerge toy build .cache/toy --pool-items 2000
    .venv/bin/python bench/fitness.py --config configs/toy_pool.yaml --task-path .cache/toy/pool_tasks \
        --heldout-tasks toy_capital_mc_heldout,toy_color_mc_heldout,toy_sum_mc_heldout \
        --seeds 0 1 2 3 4 --fevals 48 --factor 4 --out bench/results/budget_toy_pool.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("full", "racing", "subsets", "irt")


def fitness_for(mode: str, cfg, seed: int, options: dict):
    from hotmerge.config.evolve import IrtConfig, RacingConfig, SubsetsConfig
    from hotmerge.search.coordinator import Fitness

    specs = tuple((t.name, t.metric, t.weight) for t in cfg.tasks)
    return Fitness(racing=RacingConfig(**options.get("racing", {})) if mode == "racing" else None,
                   subsets=SubsetsConfig(**options.get("subsets", {})) if mode == "subsets" else None,
                   irt=IrtConfig(**options.get("irt", {})) if mode == "irt" else None, specs=specs, seed=seed)


def search(worker, cfg, mode: str, *, seed: int, fevals: int, popsize: int, run_dir: Path, options: dict) -> dict:
    """One search; after every generation, and after every scoring of CMA-ES's mean: documents so
    far, the chosen genotype and CMA-ES's mean."""
    from hotmerge.run.evolve import resume_search
    from hotmerge.run.storage import RunDir, best_record
    from hotmerge.search.coordinator import Coordinator
    from hotmerge.search.strategy import Search

    genome = worker.genome
    run = RunDir(run_dir)
    run.path.mkdir(parents=True)
    strategy = resume_search(run, lambda: Search(genome.x0(), 1 / 6, seed, fevals, popsize), fevals)
    fitness = fitness_for(mode, cfg, seed, options)
    generations = []
    tell = strategy.tell

    def keep(generation: int, mean: list) -> None:
        """A point of the curve: what is known now (the chosen recipe as best_config.yaml's rule
        picks it from the records so far; CMA-ES's means scored cost documents too)."""
        records = run.records()
        chosen = best_record(records)
        generations.append({"generation": generation, "documents": sum(r.get("items", 0) for r in records),
                            "chosen": None if chosen is None else chosen["genotype"], "mean": mean})

    def tell_and_keep_the_mean(candidates, told):
        # What is known when the generation ends: a mode that scores an estimate in full
        # generations later must not be credited with that full score earlier.
        tell(candidates, told)
        keep(strategy.generation - 1, strategy.xfavorite.tolist())

    def keep_a_mean_scored(record):
        # A mean scored before its generation is asked may be chosen at once: a user who stops
        # there takes it, without the generation's documents.
        if record.get("xfavorite"):
            keep(record["generation"], record["genotype"])

    strategy.tell = tell_and_keep_the_mean
    coordinator = Coordinator(run, strategy, worker, fevals, keep_a_mean_scored, genotype_size=genome.size,
                              log=lambda *_: None, fitness=fitness)
    started = time.perf_counter()
    coordinator.run_loop()
    wall = time.perf_counter() - started
    return {"wall_s": wall, "generations": generations, "evaluations": len(run.records())}


def heldout_curve(worker, generations: list[dict], cache: dict) -> list[dict]:
    def heldout(genotype):
        key = tuple(genotype)
        if key not in cache:
            result = worker.evaluate_heldout(np.asarray(genotype, dtype=float))
            cache[key] = (result.get("heldout_score"), result.get("heldout_stderr"))
        return cache[key]

    curve = []
    for g in generations:
        chosen = heldout(g["chosen"]) if g["chosen"] is not None else (None, None)
        mean = heldout(g["mean"])
        curve.append({"generation": g["generation"], "documents": g["documents"], "chosen": chosen[0],
                      "chosen_stderr": chosen[1], "mean": mean[0], "mean_stderr": mean[1]})
    return curve


def value_at(curve: list[dict], documents: float, key: str) -> float | None:
    """The curve's value after the last generation within `documents` (a step function)."""
    value = None
    for point in curve:
        if point["documents"] > documents:
            break
        if point[key] is not None:
            value = point[key]
    return value


def summarise(runs: list[dict], seeds: list[int]) -> dict:
    full = [r for r in runs if r["mode"] == "full"]
    budget = statistics.mean(r["curve"][-1]["documents"] for r in full)
    finals = [value_at(r["curve"], budget, "chosen") for r in full]
    target = statistics.mean(finals)
    target_se = statistics.stdev(finals) / math.sqrt(len(finals)) if len(finals) > 1 else 0.0
    summary = {"budget_documents": budget, "full_final_heldout": target, "full_final_heldout_stderr": target_se,
               "modes": {}}
    # Where full evaluation itself first reached that score: the saving against it is the one
    # that does not grow with a budget past full evaluation's plateau.
    own = None
    for mode in MODES:
        rows = [r for r in runs if r["mode"] == mode]
        if not rows:
            continue
        grid = sorted({p["documents"] for r in rows for p in r["curve"]})
        reached = None
        mean_curve = []
        for documents in grid:
            values = [value_at(r["curve"], documents, "chosen") for r in rows]
            if any(v is None for v in values):
                continue
            mean = statistics.mean(values)
            mean_curve.append((documents, mean))
            if reached is None and mean >= target - target_se:
                reached = documents
        if mode == "full":
            own = reached
        at_budget = [value_at(r["curve"], budget, "chosen") for r in rows]
        at_budget = [v for v in at_budget if v is not None]
        summary["modes"][mode] = {
            "seeds": sorted(r["seed"] for r in rows),
            "documents_to_reach_full": reached,
            "saving": budget / reached if reached else None,
            "heldout_at_full_budget": statistics.mean(at_budget) if at_budget else None,
            "heldout_at_full_budget_stderr": (statistics.stdev(at_budget) / math.sqrt(len(at_budget))
                                              if len(at_budget) > 1 else None),
            "mean_curve": mean_curve,
        }
    summary["full_documents_to_reach"] = own
    for row in summary["modes"].values():
        reached = row["documents_to_reach_full"]
        row["saving_vs_full_reaching"] = own / reached if own and reached else None
    return summary


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = dict(zip(MODES, ("black", "tab:blue", "tab:orange", "tab:green")))
    for mode, row in results["summary"]["modes"].items():
        if row["mean_curve"]:
            x, y = zip(*row["mean_curve"])
            # full on top and wider: IRT's calibration generations are full evaluation's own
            ax.step(x, y, where="post", color=colours[mode], label=f"{mode}: chosen recipe",
                    lw=3 if mode == "full" else 1.5, zorder=3 if mode == "full" else 2, alpha=0.6 if mode == "full" else 1)
        means = [r for r in results["runs"] if r["mode"] == mode]
        points = [(p["documents"], p["mean"]) for r in means for p in r["curve"] if p["mean"] is not None]
        if points:
            ax.scatter(*zip(*points), s=6, alpha=0.35, color=colours[mode])
    summary = results["summary"]
    ax.axhline(summary["full_final_heldout"], color="grey", ls="--", lw=0.8,
               label=f"full at its budget ({summary['full_final_heldout']:.3f})")
    ax.axvline(summary["budget_documents"], color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("search documents scored (log)")
    ax.set_ylabel("held-out score (mean over seeds; dots: CMA-ES's mean, each run)")
    seeds = len({r["seed"] for r in results["runs"]})
    ax.set_title(f"{Path(results['config']).name}: held-out quality per document, {seeds} seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--heldout-tasks", required=True, help="comma-separated held-out task names")
    parser.add_argument("--heldout-metric", default=None, help="their metric (default: the first search task's)")
    parser.add_argument("--task-path", action="append", default=[], help="a folder of task YAML (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--fevals", type=int, default=96, help="full evaluation's evaluations")
    parser.add_argument("--factor", type=float, default=8.0, help="subsets' and irt's evaluations, × --fevals")
    parser.add_argument("--racing-factor", type=float, default=1.0,
                        help="racing's evaluations, × --fevals (it saves under 2× documents per generation)")
    parser.add_argument("--popsize", type=int, default=16)
    parser.add_argument("--options", type=json.loads, default={},
                        help='the modes\' settings other than the defaults, as JSON: {"subsets": {"maximum": 0.1}}')
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--limit", default=None, help="items per search task: a number, or 'all'")
    parser.add_argument("--out", default="bench/results/budget_toy.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the runs already in --out (same settings) and run only the missing ones")
    parser.add_argument("--replot", action="store_true", help="only recompute --out's summary and plot")
    args = parser.parse_args()
    if args.replot:
        save(json.loads(Path(args.out).read_text()), Path(args.out))
        return

    from hotmerge.config.evolve import RacingConfig, TaskConfig, load_config, validate_config
    from hotmerge.search.worker import CandidateWorker

    cfg = load_config(args.config)
    metric = args.heldout_metric or cfg.tasks[0].metric
    update = {"racing": RacingConfig(), "subsets": None, "irt": None,  # racing: the worker keeps the pool's plan
              "heldout_tasks": [TaskConfig(name=t, metric=metric) for t in args.heldout_tasks.split(",")],
              "task_paths": [*cfg.task_paths, *args.task_path]}
    if args.limit is not None:
        update["limit"] = None if args.limit == "all" else int(args.limit)
    cfg = cfg.model_copy(update=update)
    worker = CandidateWorker(validate_config(cfg), backend=args.backend, seed=0)
    pool = worker.race_plan.total
    results = {"config": args.config, "seeds": args.seeds, "fevals": args.fevals, "factor": args.factor,
               "racing_factor": args.racing_factor,
               "popsize": args.popsize, "options": args.options, "pool_documents": pool, "backend": args.backend,
               "machine": platform.processor() or platform.machine(), "runs": []}
    if args.append and Path(args.out).is_file():
        earlier = json.loads(Path(args.out).read_text())
        settings = ("config", "fevals", "factor", "racing_factor", "popsize", "options", "pool_documents", "backend")
        if any(earlier.get(k, {} if k == "options" else None) != results[k] for k in settings):
            parser.error(f"{args.out} was measured with other settings: compare {settings}")
        results["runs"] = earlier["runs"]
        results["seeds"] = sorted({*earlier["seeds"], *args.seeds})
    done = {(r["seed"], r["mode"]) for r in results["runs"]}
    cache: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for mode in args.modes:
                if (seed, mode) in done:
                    continue
                factor = {"full": 1.0, "racing": args.racing_factor}.get(mode, args.factor)
                fevals = int(args.fevals * factor)
                out = search(worker, cfg, mode, seed=seed, fevals=fevals, popsize=args.popsize,
                             run_dir=Path(scratch) / f"{mode}-{seed}", options=args.options)
                curve = heldout_curve(worker, out["generations"], cache)
                row = {"seed": seed, "mode": mode, "wall_s": out["wall_s"], "evaluations": out["evaluations"],
                       "curve": curve}
                results["runs"].append(row)
                save(results, Path(args.out))  # after every run: a long benchmark keeps what it measured
                last = curve[-1]
                print(json.dumps({"seed": seed, "mode": mode, "documents": last["documents"],
                                  "chosen": last["chosen"], "mean": last["mean"], "wall_s": round(out["wall_s"], 1)}),
                      flush=True)
    worker.close()
    save(results, Path(args.out))
    print(json.dumps({k: v for k, v in results["summary"].items() if k != "modes"}, indent=2))
    for mode, row in results["summary"]["modes"].items():
        print(mode, {k: v for k, v in row.items() if k != "mean_curve"})


def save(results: dict, out: Path) -> None:
    """The runs so far, their summary (once full evaluation has run) and the plot."""
    if any(r["mode"] == "full" for r in results["runs"]):
        results["summary"] = summarise(results["runs"], sorted({r["seed"] for r in results["runs"]}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if "summary" in results:
        plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
