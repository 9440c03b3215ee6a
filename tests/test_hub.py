"""Models named as mergekit names them: hub repository names, name@revision and
model+lora, resolved offline from a Hugging Face cache on disk (the layout huggingface_hub
reads: models--org--name/snapshots/<commit>/ and refs/<branch or tag>), built from the
toy family's folders by links."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from hotmerge.errors import ConfigError
from runs import HOTMERGE, SEARCH_TASKS

MAIN, V1, PICKLED = "1" * 40, "2" * 40, "3" * 40


@dataclass(frozen=True)
class HubCache:
    path: Path
    family: object

    def env(self) -> dict:
        return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(self.path)}

    def snapshot(self, repo: str, commit: str) -> Path:
        return self.path / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


def _cache_repo(cache: Path, repo: str, snapshots: dict[str, Path], refs: dict[str, str]) -> None:
    """A cached repository: each snapshot's files linked to a folder's, refs naming commits."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for commit, folder in snapshots.items():
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True)
        for file in Path(folder).iterdir():
            (snap / file.name).symlink_to(file)
    (root / "refs").mkdir()
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(toy_family, tmp_path_factory) -> HubCache:
    """toyorg/base, toyorg/expert_capital; toyorg/expert_color, whose main is the sum expert
    and whose tag v1 (commit V1) is the color expert; toyorg/lora_sum, a LoRA adapter of the
    base; toyorg/pickled, a config.json and pytorch_model.bin only."""
    from test_merge_configs import _lora_adapter

    tmp = tmp_path_factory.mktemp("hub")
    cache = tmp / "cache"
    experts = dict(zip(toy_family.skills, toy_family.experts))
    _cache_repo(cache, "toyorg/base", {MAIN: toy_family.base}, {"main": MAIN})
    _cache_repo(cache, "toyorg/expert_capital", {MAIN: experts["capital"]}, {"main": MAIN})
    _cache_repo(cache, "toyorg/expert_color", {MAIN: experts["sum"], V1: experts["color"]},
                {"main": MAIN, "v1": V1})
    adapter = _lora_adapter(str(toy_family.base), tmp / "lora")
    _cache_repo(cache, "toyorg/lora_sum", {MAIN: Path(adapter)}, {"main": MAIN})
    pickled = tmp / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((Path(toy_family.base) / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    _cache_repo(cache, "toyorg/pickled", {PICKLED: pickled}, {"main": PICKLED})
    return HubCache(cache, toy_family)


def genome_config(path: Path, **genome) -> Path:
    """task_arithmetic over hub names: a plain name, a tag, and model+lora by names."""
    config = {
        "genome": {"models": ["toyorg/expert_capital", "toyorg/expert_color@v1", "toyorg/base+toyorg/lora_sum"],
                   "base_model": "toyorg/base", "merge_method": "task_arithmetic", "layer_granularity": 2,
                   **genome},
        "tasks": SEARCH_TASKS,
        "apply_chat_template": False,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run(hub: HubCache, *words: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*HOTMERGE, *words], capture_output=True, text=True, timeout=600, env=env or hub.env())


def test_names_revisions_and_lora_names_resolve_to_cached_snapshots(hub_cache, tmp_path, monkeypatch):
    from hotmerge.config.evolve import load_config, validate_config
    from hotmerge.models import hub

    monkeypatch.setattr(hub, "_cache", None)
    hub.use_cache(hub_cache.path)
    config = genome_config(tmp_path / "names.yaml", tokenizer_source="toyorg/expert_color@" + V1)
    validated = validate_config(load_config(config))
    genome = validated.config.genome
    assert genome.models == [str(hub_cache.snapshot("toyorg/expert_capital", MAIN)),
                             str(hub_cache.snapshot("toyorg/expert_color", V1)),
                             f"{hub_cache.snapshot('toyorg/base', MAIN)}+{hub_cache.snapshot('toyorg/lora_sum', MAIN)}"]
    assert genome.base_model == str(hub_cache.snapshot("toyorg/base", MAIN))
    assert genome.tokenizer_source == str(hub_cache.snapshot("toyorg/expert_color", V1))  # a commit as revision
    assert validated.models[2].lora == str(hub_cache.snapshot("toyorg/lora_sum", MAIN))
    # the branch, not the tag: main is another model
    main = validate_config(load_config(genome_config(tmp_path / "main.yaml", models=["toyorg/expert_color"])))
    assert main.config.genome.models == [str(hub_cache.snapshot("toyorg/expert_color", MAIN))]


@pytest.mark.parametrize("reference, words", [
    ("toyorg/absent", ["toyorg/absent", "does not exist in the Hugging Face cache", "HF_HUB_OFFLINE=0 hf download "
                       "toyorg/absent --include '*.safetensors' --include '*.json'"]),
    ("toyorg/expert_color@v2", ["toyorg/expert_color@v2", "hf download toyorg/expert_color --revision v2"]),
    ("toyorg/base+toyorg/absent_lora", ["adapter folder", "toyorg/absent_lora", "hf download toyorg/absent_lora"]),
    ("toyorg/pickled", ["toyorg/pickled", "only pickle checkpoints (pytorch_model.bin)", "safetensors only"]),
])
def test_an_unusable_name_is_one_line_naming_it_and_the_fix(hub_cache, tmp_path, reference, words):
    config = genome_config(tmp_path / "c.yaml", models=["toyorg/expert_capital", reference])
    run_dir = tmp_path / "run"
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run, hub_cache, "plan", str(config)),
                pool.submit(run, hub_cache, "evolve", str(config), "--storage-path", str(run_dir))]
    for done in (r.result() for r in runs):
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "genome.models[1]" in lines[0], lines
        for word in words:
            assert word in lines[0], lines[0]
    assert not run_dir.exists()


@pytest.mark.slow  # huggingface_hub retries an unreachable hub with backoff, half a minute
def test_a_name_neither_cached_nor_reachable_is_one_line(hub_cache, tmp_path):
    """Online (HF_HUB_OFFLINE=0) with no hub to reach and the name not cached: one line that
    says so and names the download command, not a connection traceback."""
    dead = "http://127.0.0.1:9"  # nothing listens here
    env = {**hub_cache.env(), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": dead, "HTTPS_PROXY": dead, "HTTP_PROXY": dead}
    refused = run(hub_cache, "plan", str(genome_config(tmp_path / "absent.yaml", models=["toyorg/absent"])), env=env)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: genome.models[0]: toyorg/absent"), lines
    assert "the hub cannot be reached" in lines[0] and "`hf download toyorg/absent --include" in lines[0]


def test_a_local_folder_with_a_revision_is_refused(hub_cache, tmp_path):
    from hotmerge.config.evolve import load_config

    config = genome_config(tmp_path / "c.yaml", models=[f"{hub_cache.family.experts[0]}@v1"])
    with pytest.raises(ConfigError, match="only a hub repository has: drop @v1"):
        load_config(config)


def documented_command(config: Path, run_dir: Path, tasks: Path, *extra: str) -> list[str]:
    """mergekit-evolve's documented command line (docs/evolve.md: "--strategy pool --wandb
    --wandb-project mergekit-evolve --wandb-entity arcee-ai --storage-path ... ./config.yml",
    with its --in-memory, --task-search-path, --max-fevals and --save-final-model), the
    program name changed. A population of 2 keeps it to one generation."""
    return [*HOTMERGE, "evolve", "--strategy", "pool", "--in-memory", "--wandb", "--wandb-project", "mergekit-evolve",
            "--wandb-entity", "arcee-ai", "--storage-path", str(run_dir), "--task-search-path", str(tasks),
            "--max-fevals", "2", "--force-population-size", "2", "--save-final-model", *extra, str(config)]


def pool_config(path: Path) -> Path:
    """A published-style config: hub names, a revision, model+lora by names, and tasks
    found through --task-search-path (the toy's large pool, a few items of each)."""
    genome_config(path)
    data = yaml.safe_load(path.read_text())
    data["tasks"] = ["toy_pool_capital_mc_search", "toy_pool_color_mc_search", "toy_pool_sum_mc_search"]
    data["limit"] = 8
    path.write_text(yaml.safe_dump(data))
    return path


def run_documented(hub: HubCache, tmp_path: Path, *extra: str):
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed")
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {**hub.env(), "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
           # Any network use would fail: nothing listens here.
           "WANDB_BASE_URL": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    config = pool_config(tmp_path / "config.yml")
    from hotmerge.toy.taskfiles import write_pool_tasks

    tasks = tmp_path / "pool_tasks"  # the toy's large pool, written here: a test family has none
    write_pool_tasks(tasks, 300, seed=0)
    done = subprocess.run(documented_command(config, run_dir, tasks, *extra),
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "note:" not in done.stdout + done.stderr  # every flag of the line takes effect as it is
    assert list(wandb_dir.glob("wandb/offline-run-*")), "no offline W&B run"
    best = yaml.safe_load((run_dir / "best_config.yaml").read_text())
    named = {source["model"] for sl in best["slices"] for source in sl["sources"]}
    assert named == {"toyorg/expert_capital", "toyorg/expert_color@v1", "toyorg/base+toyorg/lora_sum",
                     "toyorg/base"}
    assert best["base_model"] == "toyorg/base"
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    return run_dir


@pytest.mark.slow
def test_mergekit_evolves_documented_command_line_runs_on_hub_names(hub_cache, tmp_path):
    """The documented command line (--vllm included), offline from the cache; then plan,
    export and eval of the run's best_config.yaml (named as the config names the models)
    through --hub-cache, mergekit-evolve's STORAGE_PATH/transformers_cache for instance: the
    export equals the run's final model."""
    pytest.importorskip("vllm")
    run_dir = run_documented(hub_cache, tmp_path, "--vllm")
    cache = ["--hub-cache", str(hub_cache.path)]
    # HF_HUB_CACHE names an empty cache: the models come through --hub-cache alone
    env = {**hub_cache.env(), "HF_HUB_CACHE": str(tmp_path / "empty")}
    out = tmp_path / "exported"
    with ThreadPoolExecutor(2) as pool:
        planned = pool.submit(run, hub_cache, "plan", str(pool_config(tmp_path / "plan.yml")), *cache, env=env)
        exported = pool.submit(run, hub_cache, "export", str(run_dir / "best_config.yaml"), str(out), *cache,
                               env=env)
        scored = pool.submit(run, hub_cache, "eval", str(run_dir / "best_config.yaml"), "--tasks", SEARCH_TASKS[0],
                             "--output", str(tmp_path / "eval.json"), *cache, env=env)
    for done in (planned, exported, scored):
        assert done.result().returncode == 0, done.result().stderr
    assert "3 models" in planned.result().stdout
    assert json.loads((tmp_path / "eval.json").read_text())["results"][SEARCH_TASKS[0]]
    ours, final = load_file(out / "model.safetensors"), load_file(run_dir / "final_model" / "model.safetensors")
    assert ours.keys() == final.keys() and all((ours[k] == final[k]).all() for k in ours)

