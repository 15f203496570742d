# facegan_dist — the two commands a new user runs: `make demo` and `make test`.
# Both create .venv and install the package with its dependencies on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision pins: these wheels are on local disk in our CI image; override on other machines,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: help setup test test-fast demo lint format bench bench-gpu gpu-wheels clean

help:
	@echo "make demo   synth -> shard -> verify -> train -> sample grid (CPU, a few minutes)"
	@echo "make test   the full CPU test suite (what CI runs)"
	@echo "make lint   ruff check + format check"
	@echo "make bench  data and training benchmarks (prints images/s and JSON lines)"
	@echo "make bench-gpu  every GPU measurement of docs/PERFORMANCE.md (scripts/gpu_bench.sh)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not distributed" $(PYTEST_ARGS)

demo: setup
	DEMO_DIR=$(DEMO_DIR) bash scripts/demo.sh

lint: setup
	$(PY) -m ruff check facegan_dist tests
	$(PY) -m ruff format --check facegan_dist tests

format: setup
	$(PY) -m ruff format facegan_dist tests
	$(PY) -m ruff check --fix facegan_dist tests

bench: setup
	$(PY) -m facegan_dist bench data
	$(PY) -m facegan_dist bench train --preset demo --steps 30

# On a GPU machine (python3 there has torch, accelerate, typer): see scripts/gpu_bench.sh.
bench-gpu:
	PY=$(PYTHON) bash scripts/gpu_bench.sh

# The wheels the lent GPU machine lacks (no registry there), for Python 3.12 x86-64, into .whl/
# (git-ignored); the device tool carries them with carry=[".whl"].
gpu-wheels: setup
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
	  webdataset==1.0.2 braceexpand==0.1.7

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
