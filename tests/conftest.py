import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_family():
    """The toy family, built once per machine into .cache (rebuilt when the generator changes)."""
    from hotmerge.toy.build import FamilyPaths, build_family, family_is_current

    root = REPO / ".cache" / "toy-test"
    if not family_is_current(root, seed=0):
        build_family(root, seed=0, log=lambda *_: None)
    return FamilyPaths(root)
