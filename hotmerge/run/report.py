"""`hotmerge report RUN_DIR`: plots and a summary of a run, finished or still running.

Everything comes from the run directory (run.json, history.jsonl, best_config.yaml);
history.jsonl may still grow and its last line may be cut short, which is read as "not
finished yet". Writes into OUT (default RUN_DIR/report):

  progress.png     every candidate's score against evaluations (failed ones marked),
                   the best-so-far line and the generation boundaries
  best_tasks.png   per-task metrics of the best candidate so far (and held-out ones)
  best_genome.png  heatmaps of the best genome: layer group x model, one panel per
                   parameter and filter set, from the record's decoded params
  pareto.png       per-task metrics of every candidate, non-dominated ones marked
                   (only with two or more tasks; with more, the first two tasks)
  budget.png       with held-out scores: each re-scored candidate's held-out score against
                   the search documents scored by the end of its generation, and the
                   search score or estimate beside it (an estimate's bias is the gap)
  summary.md       best recipe, its metrics, held-out metrics (--heldout), timings,
                   failures, non-dominated candidates
  heldout.json     with --heldout: the held-out results of the best and the x0 recipe
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from hotmerge.errors import ConfigError
from hotmerge.run.storage import RunDir, best_record, latest_records
from hotmerge.search.scores import describe

PHASES = ("apply", "forward", "metrics", "total")
MAX_TABLE_ROWS = 25


# -- reading a run --------------------------------------------------------------------------

@dataclass
class TaskSpec:
    name: str
    metric: str = "acc,none"
    weight: float = 1.0


@dataclass
class RunData:
    path: Path
    meta: dict
    records: list[dict]
    tasks: list[TaskSpec]
    best_config_text: Optional[str]
    history_lines_dropped: int = 0  # a cut last line (a run being written, or killed)
    lines: list[dict] = field(default_factory=list)  # every history line, in the order written

    @property
    def scored(self) -> list[dict]:
        return [r for r in self.records if r.get("score") is not None]

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r.get("score") is None]

    @property
    def select_by(self) -> str:
        return (self.meta.get("config") or {}).get("select_by", "search")

    @property
    def best(self) -> Optional[dict]:
        """The record best_config.yaml was written from, as evolve() picks it."""
        return best_record(self.records, self.select_by)

    @property
    def rescored(self) -> list[dict]:
        """The records scored on the held-out tasks too, best search score first."""
        found = [r for r in self.records if r.get("heldout_score") is not None and r.get("score") is not None]
        return sorted(found, key=lambda r: -r["score"])

    @property
    def genome(self) -> dict:
        return (self.meta.get("config") or {}).get("genome") or {}

    @property
    def model_labels(self) -> list[str]:
        models = self.genome.get("models") or []
        labels = [Path(str(m).rstrip("/")).name or str(m) for m in models]
        # Keep labels unique when two models share a folder name.
        return [label if labels.count(label) == 1 else str(m) for label, m in zip(labels, models)]

    @property
    def filter_labels(self) -> list[str]:
        return [f"'{f}'" for f in (self.genome.get("filters") or [])] + ["other tensors"]

    def metric_of(self, record: dict, task: TaskSpec) -> Optional[float]:
        metrics = (record.get("results") or {}).get(task.name) or {}
        value = metrics.get(task.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        return float(value)


def _task_specs(meta: dict) -> list[TaskSpec]:
    specs = []
    for task in (meta.get("config") or {}).get("tasks") or []:
        if isinstance(task, str):
            specs.append(TaskSpec(task))
        elif isinstance(task, dict) and task.get("name"):
            specs.append(TaskSpec(task["name"], task.get("metric", "acc,none"), float(task.get("weight", 1.0))))
    return specs


def load_run(run_dir: str | Path) -> RunData:
    run = RunDir(run_dir)
    if not run.exists():
        raise ConfigError(f"{run_dir} holds no run (no run.json): pass the --storage-path of a `hotmerge evolve` run")
    try:
        meta = json.loads(run.meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {run.meta_file} ({e}): is {run_dir} a hotmerge run directory?")
    # As RunDir.read_history, from one read of a file that may be growing: stop at the first
    # line that does not parse (a line cut short), and count what was left out.
    text = run.history_file.read_bytes() if run.history_file.is_file() else b""
    lines = [line for line in text.split(b"\n") if line.strip()]
    records, dropped = [], 0
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            dropped = len(lines) - i
            break
    lines, records = records, latest_records(records)  # a re-scored candidate's last line has its held-out score
    best_text = run.best_file.read_text() if run.best_file.is_file() else None
    tasks = _task_specs(meta)
    if not tasks:  # an odd run.json: take the tasks the records name
        for record in records:
            if record.get("results"):
                tasks = [TaskSpec(t, next(iter(m), "acc,none")) for t, m in record["results"].items()]
                break
    return RunData(Path(run_dir), meta, records, tasks, best_text, dropped, lines)


# -- numbers ----------------------------------------------------------------------------------

def best_so_far(records: Sequence[dict]) -> list[Optional[float]]:
    out, best = [], None
    for r in records:
        s = r.get("score")
        if s is not None and (best is None or s > best):
            best = s
        out.append(best)
    return out


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Mask of the rows no other row dominates (all >= and one >), maximising every column."""
    points = np.asarray(points, dtype=float)
    if points.size == 0:
        return np.zeros(len(points), dtype=bool)
    ge = (points[None, :, :] >= points[:, None, :]).all(axis=2)  # [i, j]: j >= i everywhere
    gt = (points[None, :, :] > points[:, None, :]).any(axis=2)
    return ~(ge & gt).any(axis=1)


def timing_table(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    phases = list(PHASES)
    for r in records:
        phases.extend(k for k in (r.get("seconds") or {}) if k not in phases)
    table = {}
    for phase in phases:
        values = [float(r["seconds"][phase]) for r in records
                  if isinstance((r.get("seconds") or {}).get(phase), (int, float))]
        if values:
            table[phase] = {"n": len(values), "sum": sum(values), "median": statistics.median(values),
                            "mean": statistics.fmean(values)}
    return table


def rates(data: RunData) -> dict[str, Optional[float]]:
    """Evaluations per minute: per worker from the summed evaluation time, and wall clock
    from run.json's creation to the last history write (start-up and pauses included)."""
    n = len(data.records)
    total = sum(float((r.get("seconds") or {}).get("total", 0.0)) for r in data.records)
    world = int(data.meta.get("world_size") or 1)
    out: dict[str, Optional[float]] = {"per_worker": 60.0 * n / total if total > 0 else None}
    out["all_workers"] = out["per_worker"] * world if out["per_worker"] is not None else None
    run = RunDir(data.path)
    out["wall"] = None
    if n and run.history_file.is_file():
        span = run.history_file.stat().st_mtime - run.meta_file.stat().st_mtime
        out["wall"] = 60.0 * n / span if span > 0 else None
        out["wall_seconds"] = span
    return out


# -- plots ------------------------------------------------------------------------------------

def budget_points(lines: Sequence[dict]) -> tuple[list[dict], str]:
    """Each held-out score with the search documents scored when it was measured, and the x
    axis's unit: the history's lines in the order written, each candidate's documents (its
    `items`) as its latest line gives them; CMA-ES's means scored in full count as any
    candidate. Held-out scoring is measurement, not search, and is not counted. Records from
    before `items` was kept count one evaluation each."""
    counted = all("items" in r for r in lines if not r.get("xfavorite") and r.get("score") is not None)
    cost: dict[tuple[int, int], int] = {}
    points = []
    for r in lines:
        key = (r["generation"], r["index"])
        if counted:
            cost[key] = r.get("items") or 0
        elif not r.get("xfavorite"):
            cost[key] = 1
        if r.get("heldout_score") is not None:
            points.append({**r, "spent": sum(cost.values())})
    return points, ("documents scored" if counted else "evaluations")


def plot_budget(data: RunData, path: Path) -> None:
    points, unit = budget_points(data.lines)
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    x = [p["spent"] for p in points]
    ax.errorbar(x, [p["heldout_score"] for p in points], yerr=[p.get("heldout_stderr") or 0 for p in points],
                fmt="o", color="tab:green", label="held-out score", zorder=3)
    ax.scatter(x, [p["score"] for p in points], marker="_", s=160, color="tab:blue",
               label="search score or estimate", zorder=2)
    ax.set_xlabel(f"search {unit} when the held-out score was measured")
    ax.set_ylabel("score")
    ax.set_title(f"{data.path.name}: held-out score against search compute")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path)


def _figure(width: float, height: float):
    """A figure drawn by the Agg canvas, without pyplot's global state (no display, thread-safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_progress(data: RunData, path: Path) -> None:
    records = data.records
    x = np.arange(1, len(records) + 1)
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    ok = [(i, r["score"]) for i, r in zip(x, records) if r.get("score") is not None]
    bad = [i for i, r in zip(x, records) if r.get("score") is None]
    if ok:
        ax.scatter([p[0] for p in ok], [p[1] for p in ok], s=18, alpha=0.6, color="tab:blue",
                   label="candidate score", zorder=2)
        best = best_so_far(records)
        bx = [i for i, b in zip(x, best) if b is not None]
        by = [b for b in best if b is not None]
        ax.step(bx, by, where="post", color="tab:orange", lw=2, label="best so far", zorder=3)
    if bad:
        low = min(p[1] for p in ok) if ok else 0.0
        span = (max(p[1] for p in ok) - low) if ok else 1.0
        ax.scatter(bad, [low - 0.08 * (span or 1.0)] * len(bad), marker="x", color="tab:red", s=40,
                   label=f"failed ({len(bad)}, drawn below the lowest score)", zorder=4)
    generations = [r.get("generation") for r in records]
    for i in range(1, len(generations)):
        if generations[i] != generations[i - 1]:
            ax.axvline(i + 0.5, color="grey", ls=":", lw=0.8, zorder=1)
    ax.set_xlabel("evaluation (dotted lines: generation boundaries)")
    ax.set_ylabel("score")
    ax.set_title(f"{data.path.name}: {len(records)} evaluations, "
                 f"{len(set(generations))} generations")
    ax.grid(alpha=0.3)
    if ok or bad:
        ax.legend(loc="lower right")
    fig.savefig(path)


def plot_best_tasks(data: RunData, best: dict, path: Path,
                    heldout: Optional[dict] = None) -> None:
    panels = [("search tasks", [(t.name, t.metric, data.metric_of(best, t)) for t in data.tasks])]
    if heldout and heldout.get("best", {}).get("results"):
        rows = []
        for task, metric in heldout["metrics"].items():
            value = (heldout["best"]["results"].get(task) or {}).get(metric)
            rows.append((task, metric, value))
        panels.append(("held-out tasks", rows))
    fig = _figure(max(5.0, 1.2 * max(len(p[1]) for p in panels) * len(panels) + 2), 4.5)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, (title, rows) in zip(axes, panels):
        names = [r[0] for r in rows]
        values = [r[2] if r[2] is not None else 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color="tab:green" if title.startswith("held") else "tab:blue")
        for bar, row in zip(bars, rows):
            label = "n/a" if row[2] is None else f"{row[2]:.3f}"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        metrics = sorted({r[1] for r in rows})
        ax.set_ylabel(", ".join(metrics))
        top = max([v for v in values] + [1.0])
        ax.set_ylim(0, top * 1.1)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"best candidate (generation {best['generation']}, #{best['index']}): "
                 f"score {best['score']:.4f}")
    fig.savefig(path)


def genome_panels(data: RunData, best: dict) -> dict[str, np.ndarray]:
    """panel title -> (G, M) matrix: one per parameter and (when S > 1) per filter set."""
    panels = {}
    filters = data.filter_labels
    for name, values in (best.get("params") or {}).items():
        array = np.asarray(values, dtype=float)  # (G, M, S)
        if array.ndim != 3:
            continue
        S = array.shape[2]
        for s in range(S):
            title = name if S == 1 else f"{name}, {filters[s] if s < len(filters) else f'filter {s}'}"
            panels[title] = array[:, :, s]
    return panels


def _group_labels(data: RunData, groups: int) -> list[str]:
    k = int(data.genome.get("layer_granularity") or 0)
    if k <= 0:
        return ["all layers"] if groups == 1 else [f"group {g}" for g in range(groups)]
    return [f"layers {g * k}-{g * k + k - 1}" if k > 1 else f"layer {g}" for g in range(groups)]


def plot_genome(data: RunData, best: dict, path: Path) -> dict[str, np.ndarray]:
    panels = genome_panels(data, best)
    if not panels:
        return panels
    params = list((best.get("params") or {}).keys())
    S = len(panels) // max(1, len(params))
    G, M = next(iter(panels.values())).shape
    models = data.model_labels if len(data.model_labels) == M else [f"model {m}" for m in range(M)]
    rows, cols = len(params), S
    fig = _figure(max(6.0, cols * (2.2 + 0.9 * M)), max(3.0, 0.6 + rows * (1.4 + 0.32 * G)))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (title, matrix) in zip(axes.flat, panels.items()):
        negative = (matrix < 0).any()
        param = title.split(",")[0]
        if negative:
            bound = float(np.abs(matrix).max()) or 1.0
            im = ax.imshow(matrix, cmap="coolwarm", vmin=-bound, vmax=bound, aspect="auto")
        elif param in ("density", "t", "epsilon", "gamma"):
            im = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        else:
            im = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(matrix.max())), aspect="auto")
        ax.set_xticks(range(M), models, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(G), _group_labels(data, G), fontsize=8)
        ax.set_title(title, fontsize=10)
        if G * M <= 160:
            lo, hi = im.get_clim()
            for g in range(G):
                for m in range(M):
                    v = matrix[g, m]
                    light = (v - lo) / (hi - lo or 1.0) < 0.6
                    ax.text(m, g, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if light else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"best genome: {describe(best)}, "
                 f"{data.genome.get('merge_method', '?')}\n(layer group x model, decoded values)", fontsize=10)
    fig.savefig(path)
    return panels


def pareto_points(data: RunData) -> tuple[list[dict], np.ndarray]:
    """Successful records that have every task's metric, and their (n, T) metric matrix."""
    rows, kept = [], []
    for r in data.scored:
        values = [data.metric_of(r, t) for t in data.tasks]
        if all(v is not None for v in values):
            rows.append(values)
            kept.append(r)
    return kept, np.asarray(rows, dtype=float).reshape(len(rows), len(data.tasks))


def plot_pareto(data: RunData, records: list[dict], points: np.ndarray, front: np.ndarray,
                best: dict, path: Path) -> None:
    fig = _figure(6.5, 5.5)
    ax = fig.subplots()
    a, b = points[:, 0], points[:, 1]
    counts = Counter(zip(a.tolist(), b.tolist()))
    size = np.array([14 + 10 * (counts[(x, y)] - 1) for x, y in zip(a.tolist(), b.tolist())])
    ax.scatter(a[~front], b[~front], s=size[~front], color="tab:grey", alpha=0.45, label="candidate")
    ax.scatter(a[front], b[front], s=size[front], color="tab:red", alpha=0.8,
               label="non-dominated" + ("" if points.shape[1] == 2 else f" (over all {points.shape[1]} tasks)"))
    front2 = non_dominated(points[:, :2])
    order = np.argsort(-a[front2])
    fx, fy = a[front2][order], b[front2][order]
    if len(fx):
        ax.step(fx, fy, where="post", color="tab:red", lw=1, alpha=0.6)
    i = next((k for k, r in enumerate(records) if r is best), None)
    if i is not None:
        ax.scatter([a[i]], [b[i]], marker="*", s=220, color="gold", edgecolor="black", zorder=5,
                   label="best score")
    t0, t1 = data.tasks[0], data.tasks[1]
    ax.set_xlabel(f"{t0.name} ({t0.metric})")
    ax.set_ylabel(f"{t1.name} ({t1.metric})")
    title = "per-task metrics (marker size: identical candidates)"
    if len(data.tasks) > 2:
        title = f"first two of {len(data.tasks)} tasks; table in summary.md\n" + title
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.savefig(path)


# -- held-out evaluation -----------------------------------------------------------------------

def evaluate_heldout(data: RunData, tasks: str, *, task_paths: Sequence[str] = (), backend: Optional[str] = None,
                     device: Optional[str] = None, batch_size: Optional[int] = None,
                     log: Callable[[str], None] = print) -> dict:
    """Score the best recipe and mergekit-evolve's x0 recipe on other tasks with the run's config."""
    from hotmerge.config.evolve import parse_config, task_list, validate_config
    from hotmerge.search.worker import CandidateWorker

    best = data.best
    if best is None:
        raise ConfigError(f"{data.path} has no successful evaluation yet: no recipe to score on --heldout")
    specs = task_list(tasks, "--heldout")
    names = [spec.name for spec in specs]
    config_path = Path(str(data.meta.get("config_path", "config.yaml")))
    cfg = parse_config(data.meta["config"], base_dir=config_path.resolve().parent,
                       source=f"{data.path / 'run.json'} config")
    if data.meta.get("hub_cache"):
        from hotmerge.models import hub

        hub.use_cache(data.meta["hub_cache"])  # hub names resolve where the run found them
    validated = validate_config(cfg, allow_crimes=bool(data.meta.get("allow_crimes"))).with_tasks(specs)
    log(f"scoring the best recipe on {', '.join(names)} ...")
    worker = CandidateWorker(validated, backend=backend or data.meta.get("backend", "hf"), device=device,
                             batch_size=batch_size, seed=int(data.meta.get("seed", 0)),
                             task_paths=list(task_paths))
    genotype = np.asarray(best["genotype"], dtype=float)
    if genotype.shape != (worker.genome.size,):
        raise ConfigError(f"the run's genotypes have {genotype.size} genes but its config now gives "
                          f"{worker.genome.size}: the models or config changed since the run")
    out = {"tasks": names, "metrics": {t.name: t.metric for t in validated.config.tasks},
           "generation": best["generation"], "index": best["index"],
           "best": worker.evaluate(genotype), "x0": worker.evaluate(worker.genome.x0()),
           "startup_seconds": worker.startup_seconds}
    return out


# -- summary ------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pm(value: Optional[float], stderr: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None and stderr == stderr else "")


def _gap_section(data: RunData) -> list[str]:
    """Search versus held-out scores of the re-scored candidates: how much of a search score
    is the search's own selection (the winner's curse), not the model."""
    rows = data.rescored
    gaps = [r["score"] - r["heldout_score"] for r in rows]
    lines = ["### Search versus held-out", "",
             f"{len(rows)} candidates were also scored on the held-out tasks "
             f"({', '.join(t['name'] if isinstance(t, dict) else t for t in data.meta['config'].get('heldout_tasks', []))}); "
             f"best_config.yaml is chosen by the {data.select_by} score. Mean gap (search - held-out): "
             f"{float(np.mean(gaps)):+.4f}.", "",
             "| generation | candidate | search score | held-out score | gap |", "|---:|---:|---:|---:|---:|"]
    for r, gap in list(zip(rows, gaps))[:MAX_TABLE_ROWS]:
        what = "CMA-ES mean" if r.get("xfavorite") else str(r["index"])
        lines.append(f"| {r['generation']} | {what} | {_pm(r['score'], r.get('stderr'))} | "
                     f"{_pm(r['heldout_score'], r.get('heldout_stderr'))} | {gap:+.4f} |")
    return lines + [""]


def write_summary(data: RunData, path: Path, files: dict[str, Path], heldout: Optional[dict],
                  pareto: Optional[tuple[list[dict], np.ndarray, np.ndarray]]) -> None:
    meta, records, best = data.meta, data.records, data.best
    genome = data.genome
    lines = [f"# hotmerge report: {data.path.name}", ""]
    max_fevals = meta.get("max_fevals")
    evaluations = sum(1 for r in records if not r.get("xfavorite"))  # CMA-ES's mean is scored apart
    state = ("budget reached" if max_fevals and evaluations >= max_fevals
             else "running, stopped or killed before its budget")
    generations = sorted({r.get("generation") for r in records if r.get("generation") is not None})
    lines += [
        f"- run directory: `{data.path}`",
        f"- config: `{meta.get('config_path', '?')}`; method `{genome.get('merge_method', '?')}`, "
        f"genome shape (G, M, S, P) = {tuple(meta.get('genome_shape') or [])}",
        f"- models: {', '.join(f'`{m}`' for m in genome.get('models') or [])}"
        + (f"; base `{genome['base_model']}`" if genome.get("base_model") else ""),
        f"- seed {meta.get('seed')}, backend {meta.get('backend')}, world size {meta.get('world_size', 1)}",
        f"- evaluations: {evaluations} of {max_fevals} ({state}); "
        f"{len(generations)} generations; {len(data.failed)} failed",
    ]
    if data.history_lines_dropped:
        lines.append("- history.jsonl ends with an unfinished line (a run still writing, or killed): "
                     "it was left out")
    lines.append("")

    lines += ["## Best candidate", ""]
    if best is None:
        lines += ["No successful evaluation yet.", ""]
    else:
        noise = f" ± {best['stderr']:.4f} (standard error)" if best.get("stderr") is not None else ""
        lines += [f"**best score {best['score']:.4f}**{noise} (generation {best['generation']}, candidate "
                  f"{best['index']}, rank {best.get('rank', 0)}), found at evaluation "
                  f"{next(i for i, r in enumerate(records, 1) if r is best)} of {len(records)}.", ""]
        if best.get("heldout_score") is not None:
            lines += [f"Held-out score {_pm(best['heldout_score'], best.get('heldout_stderr'))}: a gap of "
                      f"{best['score'] - best['heldout_score']:+.4f} to its search score "
                      f"(chosen by the {data.select_by} score).", ""]
        lines += ["Search tasks:", "",
                  "| task | metric | weight | value |", "|---|---|---:|---:|"]
        for t in data.tasks:
            lines.append(f"| {t.name} | {t.metric} | {t.weight:g} | {_fmt(data.metric_of(best, t))} |")
        extra = [(task, m, v) for task, ms in (best.get("results") or {}).items() for m, v in ms.items()
                 if not any(t.name == task and t.metric == m for t in data.tasks) and "stderr" not in m]
        for task, m, v in extra:
            lines.append(f"| {task} | {m} | - | {_fmt(v if isinstance(v, float) else v)} |")
        lines.append("")
    if data.rescored:
        lines += _gap_section(data)
    if heldout is not None:
        lines += ["### Held-out tasks", "",
                  f"The best recipe and mergekit-evolve's starting recipe (x0), scored with the run's config "
                  f"on {', '.join(heldout['tasks'])}.", ""]
        for label in ("best", "x0"):
            if heldout[label].get("score") is None:
                lines += [f"The {label} recipe failed: `{_escape(heldout[label].get('error'))}`", ""]
        lines += ["| task | metric | best recipe | x0 recipe |", "|---|---|---:|---:|"]
        for task, metric in heldout["metrics"].items():
            values = [((heldout[k].get("results") or {}).get(task) or {}).get(metric) for k in ("best", "x0")]
            lines.append(f"| {task} | {metric} | {_fmt(values[0])} | {_fmt(values[1])} |")
        lines.append(f"| **score** (weighted sum) | | {_fmt(heldout['best'].get('score'))} | "
                     f"{_fmt(heldout['x0'].get('score'))} |")
        lines.append("")

    lines += ["## Best recipe (best_config.yaml)", ""]
    if data.best_config_text is None:
        lines += ["No best_config.yaml yet.", ""]
    else:
        lines += ["```yaml", data.best_config_text.rstrip(), "```", ""]

    lines += ["## Where the time went", ""]
    table = timing_table(records)
    if table:
        lines += ["| phase | evaluations | sum (s) | median (s) | mean (s) |", "|---|---:|---:|---:|---:|"]
        for phase, v in table.items():
            lines.append(f"| {phase} | {v['n']} | {v['sum']:.2f} | {v['median']:.4f} | {v['mean']:.4f} |")
        lines.append("")
    r = rates(data)
    if r["per_worker"] is not None:
        lines.append(f"- evaluations per minute: {r['per_worker']:.1f} per worker from the summed `total` "
                     f"time; {r['all_workers']:.1f} with {meta.get('world_size', 1)} worker(s)")
    if r.get("wall") is not None:
        lines.append(f"- wall clock: {len(records)} evaluations in {r['wall_seconds']:.0f} s since run.json "
                     f"was written = {r['wall']:.1f} per minute (model start-up, checkpoints and any "
                     f"pause between a kill and the resume included)")
    lines.append("")

    lines += ["## Failures", ""]
    if not data.failed:
        lines += ["None.", ""]
    else:
        errors = Counter(str(r.get("error")) for r in data.failed)
        lines += [f"{len(data.failed)} of {len(records)} evaluations failed.", "",
                  "| count | first at (generation, candidate) | error |", "|---:|---|---|"]
        for error, count in errors.most_common(MAX_TABLE_ROWS):
            first = next(r for r in data.failed if str(r.get("error")) == error)
            lines.append(f"| {count} | ({first['generation']}, {first['index']}) | `{_escape(error)}` |")
        lines.append("")

    if pareto is not None:
        kept, points, front = pareto
        lines += ["## Non-dominated candidates", "",
                  f"Over the per-task metrics of {len(data.tasks)} tasks, {int(front.sum())} of {len(kept)} "
                  "candidates are not dominated by another (identical metric vectors are listed once)."
                  , ""]
        header = "| generation | candidate | score | " + " | ".join(t.name for t in data.tasks) + " | same |"
        lines += [header, "|---:|---:|---:|" + "---:|" * len(data.tasks) + "---:|"]
        groups: dict[tuple, list[dict]] = {}
        for r, p, f in zip(kept, points.tolist(), front):
            if f:
                groups.setdefault(tuple(p), []).append(r)
        ordered = sorted(groups.items(), key=lambda kv: -max(r["score"] for r in kv[1]))
        for values, rs in ordered[:MAX_TABLE_ROWS]:
            top = max(rs, key=lambda r: r["score"])
            lines.append(f"| {top['generation']} | {top['index']} | {top['score']:.4f} | "
                         + " | ".join(f"{v:.4f}" for v in values) + f" | {len(rs)} |")
        if len(ordered) > MAX_TABLE_ROWS:
            lines.append(f"\n... and {len(ordered) - MAX_TABLE_ROWS} more.")
        lines.append("")

    if files:
        lines += ["## Plots", ""]
        for name, file in files.items():
            if file.suffix == ".png":
                lines.append(f"![{name}]({file.name})")
        lines.append("")
    path.write_text("\n".join(lines))


# -- the whole report --------------------------------------------------------------------------

@dataclass
class Report:
    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    best: Optional[dict] = None
    heldout: Optional[dict] = None
    non_dominated: list[dict] = field(default_factory=list)
    evaluations: int = 0


def build_report(run_dir: str | Path, out: str | Path | None = None, *, heldout: Optional[str] = None,
                 task_paths: Sequence[str] = (), backend: Optional[str] = None, device: Optional[str] = None,
                 batch_size: Optional[int] = None, log: Callable[[str], None] = print) -> Report:
    data = load_run(run_dir)
    out = Path(out) if out is not None else data.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out=out, best=data.best, evaluations=len(data.records))

    held = None
    if heldout:
        held = evaluate_heldout(data, heldout, task_paths=task_paths, backend=backend, device=device,
                                batch_size=batch_size, log=log)
        (out / "heldout.json").write_text(json.dumps(held, indent=2, default=str))
        report.files["heldout"] = out / "heldout.json"
        report.heldout = held

    if data.records:
        plot_progress(data, out / "progress.png")
        report.files["progress"] = out / "progress.png"
    if data.rescored:
        plot_budget(data, out / "budget.png")
        report.files["budget"] = out / "budget.png"
    best = data.best
    pareto = None
    if best is not None:
        plot_best_tasks(data, best, out / "best_tasks.png", held)
        report.files["best_tasks"] = out / "best_tasks.png"
        report.heatmaps = plot_genome(data, best, out / "best_genome.png")
        if report.heatmaps:
            report.files["best_genome"] = out / "best_genome.png"
        if len(data.tasks) >= 2:
            kept, points = pareto_points(data)
            if len(kept):
                front = non_dominated(points)
                plot_pareto(data, kept, points, front, best, out / "pareto.png")
                report.files["pareto"] = out / "pareto.png"
                report.non_dominated = [r for r, f in zip(kept, front) if f]
                pareto = (kept, points, front)
    write_summary(data, out / "summary.md", report.files, held, pareto)
    report.files["summary"] = out / "summary.md"
    return report
