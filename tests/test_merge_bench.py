"""bench/merge_bench.py, which the GPU check runs on every method of the registry: each method
gets a candidate it can merge (its own genes, as many inputs as its contract takes)."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "merge_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("merge_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("merge_bench", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_method_of_the_registry_is_timed_on_the_toy_preset():
    bench = _bench()
    report = bench.run("toy", 1, 3, "bf16", bench.METHODS, "cpu", 1, embeddings=False)
    assert [row["method"] for row in report["rows"]] == bench.METHODS
    assert all(row["apply_s"] > 0 and row["bytes_moved"] > 0 for row in report["rows"])
    moved = {row["method"]: row["bytes_moved"] for row in report["rows"]}
    # what each reads: 2 of the 3 models for nuslerp, one for nearswap and passthrough, the base where taken
    unit = moved["passthrough"] // 2
    assert moved["nuslerp"] == 4 * unit and moved["nearswap"] == 3 * unit and moved["ties"] == 5 * unit
    assert moved["karcher"] == 4 * unit
