"""The load-time statistics cache (kernels/stats_cache.py): a warm start gives exactly the
cold start's statistics and merged weights, a changed source is a new entry, and a bad
entry is recomputed."""

import logging
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from hotmerge.config.evolve import parse_config, validate_config
from hotmerge.kernels import layout
from hotmerge.models.folder import iter_tensors
from hotmerge.runtimes.merger import Merger


@pytest.fixture
def family(toy_family, tmp_path):
    """A private copy of the toy base and two experts: the tests touch and rewrite files."""
    for name in ("base", "expert_capital", "expert_sum"):
        shutil.copytree(toy_family.root / name, tmp_path / "models" / name)
    return tmp_path / "models"


def _validated(family, method):
    base = {} if method == "slerp" else {"base_model": str(family / "base")}  # slerp takes two models
    return validate_config(parse_config({
        "genome": {"models": [str(family / "expert_capital"), str(family / "expert_sum")], **base,
                   "merge_method": method, "layer_granularity": 2},
        "tasks": ["toy_sum_mc_search"]}))


def _start(validated, folder, x):
    """A Merger over fresh live tensors, with candidate x applied: (merger, live)."""
    ref = validated.reference
    live = {name: t.clone() for name, t in iter_tensors(ref, list(ref.tensors), dtype=torch.bfloat16)}
    merger = Merger(validated, live, seed=3, stats_cache=folder)
    merger.apply(validated.genome().decode(x))
    return merger, live


def _same_stats(a, b) -> None:
    for name in ("max_source", "max_base", "max_delta", "l1", "norms", "dots"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert (a.hist is None) == (b.hist is None)
    for row_a, row_b in zip(a.hist or [], b.hist or []):
        for ha, hb in zip(row_a, row_b):
            assert np.array_equal(ha.keys, hb.keys) and np.array_equal(ha.cum, hb.cum)
            assert np.array_equal(ha.cum_l1, hb.cum_l1)
    assert (a.rank_codes is None) == (b.rank_codes is None)
    if a.rank_codes is not None:
        assert torch.equal(a.rank_codes, b.rank_codes)


def _entries(folder):
    return sorted(folder.glob("*.safetensors"))


@pytest.mark.parametrize("method", ["dare_ties", "della", "slerp"])
def test_warm_start_equals_cold_start(family, tmp_path, monkeypatch, method):
    validated = _validated(family, method)
    x = np.random.default_rng(0).uniform(0.2, 0.9, validated.genome().size)
    folder = tmp_path / "cache"
    cold, cold_live = _start(validated, folder, x)
    assert not cold.flat.stats_cache.loaded and len(_entries(folder)) == 1

    def no_compute(*args, **kwargs):
        raise AssertionError("a warm start computed the statistics")

    monkeypatch.setattr(layout, "compute_stats", no_compute)
    warm, warm_live = _start(validated, folder, x)
    assert warm.flat.stats_cache.loaded
    _same_stats(cold.flat.stats, warm.flat.stats)
    assert all(torch.equal(cold_live[name], warm_live[name]) for name in cold_live)
    assert not any(torch.equal(cold_live[name], t) for name, t in
                   iter_tensors(validated.reference, ["model.layers.0.mlp.up_proj.weight"], dtype=torch.bfloat16))


def test_a_changed_source_is_a_new_entry(family, tmp_path):
    validated = _validated(family, "ties")
    x = validated.genome().x0()
    folder = tmp_path / "cache"
    _start(validated, folder, x)
    weights = family / "expert_sum" / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touch
    touched, _ = _start(validated, folder, x)
    assert not touched.flat.stats_cache.loaded and len(_entries(folder)) == 2
    # Replaced by a copy with the same size and times (cp -p): another inode, another entry.
    shutil.copy2(weights, weights.with_suffix(".new"))
    os.replace(weights.with_suffix(".new"), weights)
    replaced, _ = _start(validated, folder, x)
    assert not replaced.flat.stats_cache.loaded and len(_entries(folder)) == 3
    again, _ = _start(validated, folder, x)
    assert again.flat.stats_cache.loaded
    # What is computed is part of the key: slerp's constants are another entry.
    slerp, _ = _start(_validated(family, "slerp"), folder, _validated(family, "slerp").genome().x0())
    assert not slerp.flat.stats_cache.loaded and len(_entries(folder)) == 4


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong shape", "miscounted histogram"])
def test_a_bad_entry_is_recomputed(family, tmp_path, caplog, damage):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    validated = _validated(family, "ties")
    x = validated.genome().x0()
    folder = tmp_path / "cache"
    cold, cold_live = _start(validated, folder, x)
    [entry] = _entries(folder)
    if damage == "garbage":
        entry.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:-100])
    else:
        with safe_open(str(entry), framework="numpy") as f:
            metadata, arrays = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
        if damage == "wrong shape":
            arrays["l1"] = arrays["l1"][:-1]
        else:
            arrays["hist_cum"] = arrays["hist_cum"] - 1
        save_file(arrays, str(entry), metadata=metadata)
    with caplog.at_level(logging.WARNING, logger="hotmerge.kernels.stats_cache"):
        again, again_live = _start(validated, folder, x)
    assert not again.flat.stats_cache.loaded
    assert [r.getMessage() for r in caplog.records if "recomputing" in r.getMessage()] != []
    _same_stats(cold.flat.stats, again.flat.stats)
    assert all(torch.equal(cold_live[name], again_live[name]) for name in cold_live)
    # ... and rewritten: the next start loads it.
    third, _ = _start(validated, folder, x)
    assert third.flat.stats_cache.loaded and _entries(folder) == [entry]


def test_no_folder_no_cache(family, tmp_path):
    merger, _ = _start(_validated(family, "ties"), None, _validated(family, "ties").genome().x0())
    assert merger.flat.stats_cache is None and merger.flat.stats is not None


def test_a_folder_that_cannot_be_written_costs_only_the_cache(family, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    validated = _validated(family, "ties")
    with caplog.at_level(logging.WARNING, logger="hotmerge.kernels.stats_cache"):
        merger, live = _start(validated, blocker / "cache", validated.genome().x0())
    assert merger.flat.stats is not None and blocker.read_text() == "x"
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_evolve_keeps_them_beside_the_run_and_a_resumed_run_loads_them(search_run, tmp_path):
    from runs import FEVALS, evolve_cmd, read_history

    [entry] = (search_run.run_dir / ".stats-cache").glob("*.safetensors")
    run_dir = tmp_path / "run"
    shutil.copytree(search_run.run_dir, run_dir)
    copied = run_dir / ".stats-cache" / entry.name
    before = copied.stat()
    done = subprocess.run(evolve_cmd(search_run.config, run_dir, FEVALS + 6), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(read_history(run_dir)) == FEVALS + 6  # one more generation: its merges needed the statistics
    after = copied.stat()  # loaded, not computed again (that would have replaced the file)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert list((run_dir / ".stats-cache").iterdir()) == [copied]
