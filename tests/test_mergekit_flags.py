"""Every option of mergekit-evolve (mergekit 0.1.5) is an option of `hotmerge evolve`:
it takes effect, says in one note what hotmerge does instead, or is refused in one line."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typer

from hotmerge.cli import _mergekit_evolve_flags, app
from hotmerge.errors import ConfigError
from hotmerge.run.evolve import ranks_for_gpus, torchrun_command
from runs import HOTMERGE, search_config


def mergekit_evolve_command():
    """mergekit-evolve's own click command, built from its source: the decorators of
    mergekit/scripts/evolve.py's main() run as written, without the module's imports (it
    imports ray, which the test environment does not install)."""
    source = Path(importlib.util.find_spec("mergekit").submodule_search_locations[0]) / "scripts" / "evolve.py"
    tree = ast.parse(source.read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    main.body = [ast.Pass()]
    module = ast.Module(body=[ast.Import(names=[ast.alias(name="click")]), main], type_ignores=[])
    namespace: dict = {}
    exec(compile(ast.fix_missing_locations(module), str(source), "exec"), namespace)
    return namespace["main"]


def hotmerge_evolve_command():
    return typer.main.get_command(app).commands["evolve"]


def test_every_mergekit_evolve_option_is_a_hotmerge_evolve_option():
    theirs, ours = mergekit_evolve_command(), hotmerge_evolve_command()
    assert theirs.name == "mergekit-evolve" and len(theirs.params) == 24  # the source was read whole
    ours_by_name = {name: p for p in ours.params for name in (*p.opts, *p.secondary_opts)}
    assert [p.name for p in theirs.params if p.param_type_name == "argument"] == ["genome_config_path"]
    assert [p.param_type_name for p in ours.params].count("argument") == 1
    for param in theirs.params:
        if param.param_type_name != "option":
            continue
        for name in (*param.opts, *param.secondary_opts):
            assert name in ours_by_name, f"mergekit-evolve's {name} is not an option of hotmerge evolve"
            mine = ours_by_name[name]
            # the same shape on the command line: a flag, a --x/--no-x pair, or an option with a value
            assert mine.is_flag == param.is_flag, name
            assert bool(mine.secondary_opts) == bool(param.secondary_opts), name
            assert mine.multiple == param.multiple, name
            assert (name in mine.secondary_opts) == (name in param.secondary_opts), name


def test_notes_say_what_hotmerge_does_instead():
    plain = dict(strategy="pool", in_memory=None, merge_cuda=None, reshard=None, trust_remote_code=False,
                 load_in_8bit=False, load_in_4bit=False)
    assert _mergekit_evolve_flags(**plain) == []
    assert _mergekit_evolve_flags(**{**plain, "in_memory": True}) == []  # what hotmerge always does
    for change, words in [({"strategy": "buffered"}, "--strategy buffered: each rank keeps one model resident"),
                          ({"strategy": "serial"}, "--strategy serial"),
                          ({"in_memory": False}, "--no-in-memory: hotmerge always merges in memory"),
                          ({"merge_cuda": True}, "--merge-cuda changes nothing"),
                          ({"merge_cuda": False}, "--no-merge-cuda changes nothing"),
                          ({"reshard": True}, "--reshard changes nothing"),
                          ({"reshard": False}, "--no-reshard changes nothing")]:
        notes = _mergekit_evolve_flags(**{**plain, **change})
        assert len(notes) == 1 and notes[0].startswith(words), notes


def test_num_gpus_counts_the_ranks_it_starts(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert ranks_for_gpus(None, 1, None) == 1
    with pytest.raises(ConfigError, match="drop --device"):
        ranks_for_gpus(2, 1, "cpu")
    with pytest.raises(ConfigError, match="not a multiple of --tensor-parallel-size 2"):
        ranks_for_gpus(3, 2, None)
    # under torchrun the group is already there: it must be the one --num-gpus asks for
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ranks_for_gpus(4, 2, None) == 1
    with pytest.raises(ConfigError, match="asks for 4 ranks but torchrun started 2"):
        ranks_for_gpus(4, 1, None)
    command = torchrun_command(4, ["evolve", "c.yaml", "--num-gpus", "4"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "hotmerge",
                           "evolve", "c.yaml", "--num-gpus", "4"]


@pytest.mark.slow  # several CLI processes: 20 s or more
def test_refused_flags_are_one_line_before_any_work(toy_family, tmp_path):
    import torch

    config = search_config(toy_family, tmp_path / "toy.yaml")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cases = [(["--trust-remote-code"], "never runs code from a model folder"),
             (["--load-in-8bit"], "--load-in-8bit: hotmerge writes each merge in place into 16-bit live weights"),
             (["--load-in-4bit"], "--load-in-4bit"),
             (["-s", "fifo"], "--strategy 'fifo' is not one of mergekit-evolve's"),
             (["--num-gpus", str(gpus + 1)], f"--num-gpus {gpus + 1} but this machine has {gpus} GPU")]

    def refused(case):
        i, (flags, _) = case
        run_dir = tmp_path / f"run{i}"
        done = subprocess.run([*HOTMERGE, "evolve", str(config), "--storage-path", str(run_dir), *flags],
                              capture_output=True, text=True, timeout=300)
        return done, run_dir

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(refused, enumerate(cases)))
    for (done, run_dir), (flags, words) in zip(results, cases):
        assert done.returncode == 2, (flags, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (flags, lines)
        assert not run_dir.exists()


@pytest.mark.slow  # several CLI processes: 20 s or more
def test_allow_crimes_merges_differing_architectures_of_one_layout(toy_family, tmp_path):
    """An expert whose config.json names another architecture (same tensors, same shapes):
    refused with the flag named, accepted with --allow-crimes."""
    crime = tmp_path / "expert_mistral"
    crime.mkdir()
    for file in Path(toy_family.experts[0]).iterdir():
        if file.name != "config.json":
            (crime / file.name).symlink_to(file)
    config_json = json.loads((Path(toy_family.experts[0]) / "config.json").read_text())
    (crime / "config.json").write_text(json.dumps({**config_json, "architectures": ["MistralForCausalLM"],
                                                   "model_type": "mistral"}))
    config = search_config(toy_family, tmp_path / "crimes.yaml", models=[str(crime), *map(str, toy_family.experts[1:])])
    with ThreadPoolExecutor(2) as pool:
        refused, allowed = pool.map(
            lambda extra: subprocess.run([*HOTMERGE, "plan", str(config), *extra], capture_output=True, text=True,
                                         timeout=300), ([], ["--allow-crimes"]))
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "MistralForCausalLM" in lines[0] and "--allow-crimes" in lines[0], lines
    assert allowed.returncode == 0, allowed.stderr
    assert "3 models" in allowed.stdout
