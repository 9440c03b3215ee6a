"""The embedded model families that `hotmerge toy` builds, tabulates and compares.

    toy   a 4-layer Llama with a word-level vocabulary, trained from scratch (build.py)
    smol  SmolLM2-135M-Instruct from PyPI and three experts fine-tuned from it (smol.py)

A family folder holds base/, expert_<skill>/ per skill and family.json, which names
the family (a toy folder written before the smol family existed names none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hotmerge.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    skills: tuple[str, ...]
    variants: tuple[str, ...]  # task variants: mc (acc) and gen (exact_match)
    compare_variant: str  # the variant the demo searches on and `toy compare` scores
    task_name: Callable[[str, str, str], str]  # (skill, variant, split) -> lm-eval task
    build_module: str  # its build_family(out_dir, seed, log=...) and family_is_current(out_dir, seed)

    def tasks(self, variant: str, split: str) -> dict[str, str]:
        """skill -> task name."""
        return {skill: self.task_name(skill, variant, split) for skill in self.skills}

    def builder(self):
        import importlib

        return importlib.import_module(self.build_module)


def metric(variant: str) -> str:
    return "acc,none" if variant == "mc" else "exact_match,none"


def _toy() -> Family:
    from hotmerge.toy import taskfiles, world

    return Family("toy", world.SKILLS, taskfiles.VARIANTS, "mc", taskfiles.task_name, "hotmerge.toy.build")


def _smol() -> Family:
    from hotmerge.toy import smol_taskfiles, smol_world

    return Family("smol", smol_world.SKILLS, smol_taskfiles.VARIANTS, "gen", smol_taskfiles.task_name,
                  "hotmerge.toy.smol")


FAMILIES: dict[str, Callable[[], Family]] = {"toy": _toy, "smol": _smol}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"--family {name!r} is not a family: use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]()


def family_in(folder: Path) -> Family:
    """The family whose build wrote `folder`, read from its family.json."""
    manifest = Path(folder) / "family.json"
    if not manifest.is_file():
        raise ConfigError(f"{folder} holds no model family (no family.json): build one with "
                          f"`hotmerge toy build [--family smol] {folder}`")
    return family(json.loads(manifest.read_text()).get("family", "toy"))
