"""What the per-library compat modules share: version ranges and reaching attributes.

runtimes/vllm_compat.py and scoring/lm_eval_compat.py hold every use of their library's
internals; each checks the installed version against the range it was tested with, and
that every attribute it reaches is there, before any work starts.
"""

from __future__ import annotations

import importlib


def version_in_range(version: str, spec: str) -> bool:
    """Whether `version` (pre-releases and local builds included) satisfies the specifier."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def attribute_path(obj, path: str):
    """obj.a.b.c for path "a.b.c", or None where a part is missing (or None)."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def module_attribute(module: str, path: str):
    """module.a.b, or None when the module does not import or a part is missing."""
    try:
        root = importlib.import_module(module)
    except ImportError:
        return None
    return attribute_path(root, path)


def check_reached(reached, missing) -> None:
    """Every (module, attribute path, why) in `reached` exists; else raise missing(label, why)."""
    for module, path, why in reached:
        if module_attribute(module, path) is None:
            raise missing(f"{module}.{path}", why)
