"""The `hotmerge` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hotmerge.engine.errors import ConfigError

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


def main() -> None:
    try:
        app()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
