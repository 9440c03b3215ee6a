"""Racing replayed on full generations: how many items each rule would score, and how often
it would stop a candidate of the true best μ, over many item orders.

`collect` scores every candidate of a few plain CMA-ES generations on every search item
(lm-eval's per-item values, one resident model) and keeps them; `replay` then races each
generation again with search/racing.py's Race, once per item order (the plan's seed), so
the saving and the wrong-stop rate are measured on the same candidates many times over,
without the forward passes. A generation is wrong when any decision is: a candidate
stopped as outside that fewer than μ others beat on the full scores, or stopped as inside
that fewer than λ - μ others are worse than (racing.delta bounds the share of such
generations). The replay also checks that the top μ of what CMA-ES is told (Race.told)
is the race's own best μ whenever no decision is wrong.

    .venv/bin/python bench/race_replay.py collect --config configs/smol.yaml --limit all \
        --seeds 0 1 --generations 3 --out bench/results/race_items_smol.jsonl
    .venv/bin/python bench/race_replay.py replay bench/results/race_items_smol.jsonl --orders 100 \
        --schedule 0.125 0.25 0.5 1 --out bench/results/race_replay_smol.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def collect(args) -> None:
    from hotmerge.config.evolve import RacingConfig, load_config, validate_config
    from hotmerge.search.strategy import Search
    from hotmerge.search.worker import CandidateWorker

    cfg = load_config(args.config)
    update = {"racing": RacingConfig(schedule=[1.0])}  # one round: every item, in the plan's order
    if args.limit is not None:
        update["limit"] = None if args.limit == "all" else int(args.limit)
    cfg = cfg.model_copy(update=update)
    worker = CandidateWorker(validate_config(cfg), backend=args.backend, seed=0)
    specs = [(t.name, t.metric, t.weight) for t in cfg.tasks]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        for seed in args.seeds:
            search = Search(worker.genome.x0(), 1 / 6, seed, args.popsize * args.generations, args.popsize)
            for _ in range(args.generations):
                candidates, generation = search.ask(), search.generation
                positions = worker.race_plan.positions(generation, 0)
                rows = []
                for index, x in enumerate(candidates):
                    result = worker.evaluate_items(x, generation, 0, worker.race_plan.total)
                    if result.get("error"):
                        raise SystemExit(f"candidate {index} failed: {result['error']}")
                    # spec -> values in document order, whatever order the plan scored them in
                    values = {}
                    for spec, vs in result["values"].items():
                        docs = positions[specs[int(spec)][0]]
                        values[spec] = [v for _, v in sorted(zip(docs, vs))]
                    rows.append({"seed": seed, "generation": generation, "index": index, "values": values})
                scores = [sum(w * statistics.mean(row["values"][str(s)]) for s, (_, _, w) in enumerate(specs))
                          for row in rows]
                search.tell(candidates, scores)
                for row in rows:
                    handle.write(json.dumps({**row, "specs": specs, "mu": search.mu}) + "\n")
                handle.flush()
                print(f"seed {seed} generation {generation}: scores {min(scores):.3f} to {max(scores):.3f}",
                      flush=True)
    worker.close()


def replay_generation(rows: list[dict], schedule: tuple[float, ...], delta: float, order_seed: int,
                      batch: int) -> dict:
    """Race one generation's full per-item values again, in the order of `order_seed`."""
    from hotmerge.search.racing import INSIDE, OUTSIDE, Race, RacePlan

    specs = rows[0]["specs"]
    counts = {task: len(rows[0]["values"][str(s)]) for s, (task, _, _) in enumerate(specs)}
    plan = RacePlan(counts, schedule, order_seed, batch=batch)
    race = Race(plan, [tuple(s) for s in specs], len(rows), rows[0]["mu"], delta, generation=0)
    for round_ in range(plan.rounds):
        positions = plan.positions(0, round_)
        for i in race.racing():
            race.add(i, round_, {s: [rows[i]["values"][str(s)][d] for d in positions[task]]
                                 for s, (task, _, _) in enumerate(specs)})
        race.decide()
    full = [sum(w * statistics.mean(row["values"][str(s)]) for s, (_, _, w) in enumerate(specs)) for row in rows]
    size, mu = len(rows), race.mu
    outside = {i for i, e in enumerate(race.entries) if e.stopped == OUTSIDE}
    inside = {i for i, e in enumerate(race.entries) if e.stopped == INSIDE}
    wrong = any(sum(f > full[i] for f in full) < mu for i in outside) or \
        any(sum(f < full[i] for f in full) < size - mu for i in inside)
    finished = sorted((i for i in range(size) if race.entries[i].stopped is None), key=lambda i: (-full[i], i))
    race_top = inside | set(finished[:max(0, mu - len(inside))])
    told = race.told()
    told_top = set(sorted(range(size), key=lambda i: (-told[i], i))[:mu])
    return {"items": sum(race.items_seen(i) for i in range(size)), "full_items": size * plan.total,
            "wrong": wrong, "told_top_is_race_top": told_top == race_top,
            "outside": len(outside), "inside": len(inside)}


def replay(args) -> None:
    from hotmerge.config.evolve import RacingConfig

    args.schedule = args.schedule or RacingConfig().schedule
    generations: dict[tuple, list[dict]] = {}
    for line in Path(args.items).read_text().splitlines():
        row = json.loads(line)
        generations.setdefault((row["seed"], row["generation"]), []).append(row)
    outcomes = [replay_generation(sorted(rows, key=lambda r: r["index"]), tuple(args.schedule), args.delta, order,
                                  args.batch)
                for rows in generations.values() for order in range(args.orders)]
    items = sum(o["items"] for o in outcomes)
    right = [o for o in outcomes if not o["wrong"]]
    wrong_share = statistics.fmean(o["wrong"] for o in outcomes)
    summary = {"items": args.items, "generations": len(generations), "orders": args.orders,
               "schedule": args.schedule, "batch": args.batch, "delta": args.delta,
               "saving": sum(o["full_items"] for o in outcomes) / items,
               "wrong_generation_share": wrong_share,
               "wrong_generation_share_stderr": (wrong_share * (1 - wrong_share) / len(outcomes)) ** 0.5,
               "told_top_is_race_top_when_right": statistics.fmean(o["told_top_is_race_top"] for o in right)
               if right else None,
               "stopped_outside_per_generation": statistics.mean(o["outside"] for o in outcomes),
               "stopped_inside_per_generation": statistics.mean(o["inside"] for o in outcomes)}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="score every candidate of plain generations on every search item")
    c.add_argument("--config", default="configs/smol.yaml")
    c.add_argument("--limit", default=None, help="items per search task: a number, or 'all'")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    c.add_argument("--generations", type=int, default=3)
    c.add_argument("--popsize", type=int, default=16)
    c.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    c.add_argument("--out", required=True)
    r = sub.add_parser("replay", help="race the collected generations again, over many item orders")
    r.add_argument("items")
    r.add_argument("--orders", type=int, default=100)
    r.add_argument("--schedule", type=float, nargs="+", default=None, help="racing.schedule (default: its default)")
    r.add_argument("--delta", type=float, default=0.05, help="racing.delta: per generation")
    r.add_argument("--batch", type=int, default=64,
                   help="the runtime's forward batch that rounds align to (transformers: 64; vLLM: 1)")
    r.add_argument("--out", default=None)
    args = parser.parse_args()
    collect(args) if args.command == "collect" else replay(args)


if __name__ == "__main__":
    main()
