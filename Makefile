# tcscale — set-up, tests, demo. Every target that needs the environment builds it first (idempotent).
PY        ?= python3
VENV      ?= .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.tcscale-installed
NPROC     ?= 2
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint format demo demo-base bench-loader bench-kernel gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip wheel setuptools
	$(VPY) -m pip install -q -e ".[dataprep,dev]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with torch, deepspeed, diffusers, ... and tcscale (editable)

test: $(STAMP)  ## the whole CPU test suite (GPU tests skip without a GPU)
	OMP_NUM_THREADS=1 $(VPY) -m pytest -ra $(PYTEST_ARGS)

test-fast: $(STAMP)  ## everything except the multi-process / slow tests
	OMP_NUM_THREADS=1 $(VPY) -m pytest -ra -m "not slow and not distributed" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

demo: $(STAMP)  ## finetune the shipped base: LDM-only vs TokenCompose vs SepEn, 3 seeds (DEMO_FAST=1: 1 short seed); docs/DEMO.md
	$(VPY) launchers/demo.py

demo-base: $(STAMP)  ## pretrain the demo's base model and ship it into tcscale/demo_base (tcscale/demo_base/README.md)
	$(VPY) launchers/demo_base.py

bench-loader: $(STAMP)
	$(VPY) benchmarks/bench_loader.py

bench-kernel: $(STAMP)  ## needs a CUDA GPU
	$(VPY) benchmarks/bench_grounded_attention.py

gpu-wheels: $(STAMP)  ## .gpu_wheels/: what a lent GPU machine lacks, to carry to benchmarks/gpu/session.sh
	VPY=$(VPY) benchmarks/gpu/carry_wheels.sh

clean:
	rm -rf runs .pytest_cache
