"""Every command's --help reads whole in an 80-column terminal: no option name cut short."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from hotmerge.cli import app

COLUMNS = 80


def is_group(command) -> bool:
    return hasattr(command, "commands")  # typer may bring its own copy of click: no isinstance


def commands(group, path=()) -> list[tuple[tuple[str, ...], object]]:
    """The command tree below `group`: (the words that call it, the click command)."""
    found = [(path, group)]
    for name, command in group.commands.items():
        if is_group(command):
            found += commands(command, (*path, name))
        else:
            found.append(((*path, name), command))
    return found


ROOT = typer.main.get_command(app)
COMMANDS = commands(ROOT)


def render_help(words: tuple[str, ...]) -> str:
    done = CliRunner().invoke(app, [*words, "--help"], env={"COLUMNS": str(COLUMNS)}, terminal_width=COLUMNS)
    assert done.exit_code == 0, done.output
    return done.output


def test_every_command_is_covered():
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"toy build", "toy table", "toy compare", "bench merge", "evolve", "eval", "export", "plan",
            "report"} <= names


@pytest.mark.parametrize("words", [words for words, _ in COMMANDS], ids=lambda w: " ".join(w) or "hotmerge")
def test_help_shows_every_option_name_whole_at_80_columns(words):
    command = dict(COMMANDS)[words]
    text = render_help(words)
    assert "…" not in text  # rich's mark of a cut cell
    too_wide = [line for line in text.splitlines() if len(line) > COLUMNS]
    assert not too_wide, too_wide
    names = ["--help", *(name for param in command.params if param.param_type_name == "option"
                         for name in (*param.opts, *param.secondary_opts))]
    for name in names:
        # whole: not the start of a longer name, nor the tail of one (--save-final-model in --no-save-...)
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{name} is not whole in:\n{text}"


@pytest.mark.parametrize("words", [words for words, command in COMMANDS if is_group(command)],
                         ids=lambda w: " ".join(w) or "hotmerge")
def test_group_help_lists_each_command_summary_whole(words):
    text = " ".join(render_help(words).split())
    group = dict(COMMANDS)[words]
    for name, command in group.commands.items():
        summary = command.get_short_help_str(limit=10_000)
        assert f"{name} {summary}" in text, f"{name}: {summary!r} is cut short in {text!r}"


def test_the_benchmark_guard_keeps_mergekit_evolves_name():
    text = render_help(("evolve",))
    assert "--i-understand-the-depths-of-the-evils-i-am-unleashing\n" in text
