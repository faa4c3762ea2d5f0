# Two commands on a fresh machine: `make demo` and `make test`. Both are idempotent.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# pytest workers; each uses one torch thread so the workers do not fight over the cores
WORKERS ?= 2

.PHONY: install reference demo test test-slow lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# CPU torch first: `torch==2.13.0` resolves to the local CPU wheel; any other spec pulls CUDA packages.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev,kernels,quant]"
	touch $(STAMP)

install: $(STAMP)

reference: install
	$(BIN)/hf-efficient reference

demo: reference
	$(BIN)/hf-efficient demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: reference lint
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile

# long tests (recipes under accelerate, quick benchmark runs); CI runs them after `make test`
test-slow: reference
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile -m slow

bench: reference
	$(BIN)/hf-efficient bench all --record BENCHMARKS.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench-results
