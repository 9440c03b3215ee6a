"""The `hotmerge` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hotmerge.engine.errors import ConfigError, RunFailed

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
toy_app = typer.Typer(no_args_is_help=True, help="The embedded toy model family.")
app.add_typer(toy_app, name="toy")
console = Console()


@toy_app.command("build")
def toy_build(
    out_dir: Path = typer.Argument(..., help="Folder to write base/ and expert_*/ into."),
    seed: int = typer.Option(0, help="Fixes the world, the data order and the initial weights."),
    force: bool = typer.Option(False, help="Rebuild even if an identical family is there."),
) -> None:
    """Train the toy base model and one expert per skill (about half a minute on 2 cores)."""
    from hotmerge.toy.build import build_family, family_is_current

    if not force and family_is_current(out_dir, seed):
        console.print(f"toy family already built in {out_dir}")
        return
    build_family(out_dir, seed=seed, log=console.print)
    console.print(f"toy family written to {out_dir}")


@toy_app.command("table")
def toy_table(
    family_dir: Path = typer.Argument(..., help="A folder written by `hotmerge toy build`."),
    split: str = typer.Option("heldout", help="search or heldout"),
) -> None:
    """Score the base and every expert on every toy task with lm-eval."""
    from hotmerge.toy.build import FamilyPaths
    from hotmerge.toy.evaluate import skill_table
    from hotmerge.toy.taskfiles import SPLITS, VARIANTS
    from hotmerge.toy.world import SKILLS

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} is not a toy split: use one of {', '.join(SPLITS)}")
    family = FamilyPaths(family_dir)
    if not family.base.is_dir():
        raise ConfigError(f"{family_dir} holds no toy family: run `hotmerge toy build {family_dir}` first")
    models = {"base": family.base} | {f"expert_{s}": family.expert(s) for s in SKILLS}
    for variant in VARIANTS:
        table = skill_table(models, split, variant)
        metric = "acc" if variant == "mc" else "exact_match"
        show = Table(title=f"toy {split} split, {variant} ({metric}, lm-eval)")
        show.add_column("model")
        for skill in SKILLS:
            show.add_column(skill, justify="right")
        show.add_column("mean", justify="right")
        for name, row in table.items():
            values = [row[s] for s in SKILLS]
            show.add_row(name, *(f"{v:.2f}" for v in values), f"{sum(values) / len(values):.3f}")
        console.print(show)


@app.command()
def evolve(
    config: Path = typer.Argument(..., help="A mergekit-evolve genome config (YAML)."),
    storage_path: Path = typer.Option(..., help="Run directory: history, checkpoints, best_config.yaml."),
    max_fevals: int = typer.Option(100, min=1, help="Evaluation budget."),
    sigma0: float = typer.Option(1 / 6, min=1e-9, help="Initial CMA-ES step size."),
    force_population_size: int = typer.Option(None, min=2, help="CMA-ES population size (default: pycma's)."),
    random_seed: int = typer.Option(0, min=0, help="Seeds CMA-ES and the DARE/DELLA masks."),
    timeout: float = typer.Option(None, min=1, help="Stop the search after this many seconds."),
    task_search_path: list[str] = typer.Option([], help="Folder of lm-eval task YAML (repeatable)."),
    batch_size: int = typer.Option(None, min=1, help="Evaluation batch size."),
    vllm: bool = typer.Option(False, "--vllm/--no-vllm", help="vLLM backend (default: transformers)."),
    tensor_parallel_size: int = typer.Option(1, min=1, help="GPUs per vLLM engine."),
    resume: bool = typer.Option(False, help="Continue the run in --storage-path (also automatic)."),
    save_final_model: bool = typer.Option(True, "--save-final-model/--no-save-final-model",
                                          help="Write the best merge to STORAGE_PATH/final_model."),
    quiet: bool = typer.Option(False, help="Plain log lines instead of the live display."),
    device: str = typer.Option(None, help="Device for the transformers backend (default: cuda if present)."),
    wandb: bool = typer.Option(False, "--wandb/--no-wandb", help="Log to Weights & Biases."),
    wandb_project: str = typer.Option(None, help="Weights & Biases project."),
    wandb_entity: str = typer.Option(None, help="Weights & Biases entity."),
) -> None:
    """Search merge recipes with CMA-ES; single process or under `torchrun -m hotmerge evolve`."""
    from hotmerge.engine.run import EvolveOptions, evolve as run_evolve

    if wandb:
        raise ConfigError("--wandb is not available in this version: leave it off (history.jsonl has every result)")
    options = EvolveOptions(
        storage_path=storage_path, max_fevals=max_fevals, sigma0=sigma0,
        population_size=force_population_size, random_seed=random_seed, timeout=timeout,
        task_search_path=tuple(task_search_path), batch_size=batch_size, vllm=vllm,
        tensor_parallel_size=tensor_parallel_size, resume=resume,
        save_final_model=save_final_model, quiet=quiet, device=device,
    )
    best = run_evolve(config, options, console=console)
    if best is not None:
        console.print(f"best score {best['score']:.4f} (generation {best['generation']}, "
                      f"candidate {best['index']}); merge config: {storage_path / 'best_config.yaml'}")


def main() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        app()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
