# tcscale — set-up, tests, demo. Every target that needs the environment builds it first (idempotent).
PY        ?= python3
VENV      ?= .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.tcscale-installed
NPROC     ?= 2
PYTEST_ARGS ?=

EXTRAS    ?= dataprep,eval,dev

.PHONY: setup test test-fast test-realshape lint format demo demo-base doctor constraints bench-loader bench-kernel gpu-wheels clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip wheel setuptools
	$(VPY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the tested versions (constraints.txt) of torch, deepspeed, ... and tcscale (editable)

doctor: $(STAMP)  ## check the install: versions, CUDA, NCCL, the Triton kernel, DeepSpeed ops
	$(VPY) -m tcscale.doctor

constraints:  ## rewrite constraints.txt from a fresh venv resolving pyproject.toml's ranges (needs the package index)
	rm -rf .venv-constraints && $(PY) -m venv .venv-constraints
	.venv-constraints/bin/pip install -q --upgrade pip && .venv-constraints/bin/pip install -q -e ".[dataprep,eval,dev]"
	{ sed -n '1,2p' constraints.txt; .venv-constraints/bin/pip freeze --exclude-editable | grep -v -i -E '^(pip|setuptools|wheel)=='; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt && rm -rf .venv-constraints

test: $(STAMP)  ## the CPU test suite (GPU tests skip without a GPU; the released-shape runs: make test-realshape)
	OMP_NUM_THREADS=1 $(VPY) -m pytest -ra -m "not realshape" $(PYTEST_ARGS)

test-fast: $(STAMP)  ## everything except the multi-process / slow / released-shape tests
	OMP_NUM_THREADS=1 $(VPY) -m pytest -ra -m "not slow and not distributed and not realshape" $(PYTEST_ARGS)

test-realshape: $(STAMP)  ## only the shipped configs at released shapes (random weights; ~20 GiB disk, < 20 GiB RAM)
	OMP_NUM_THREADS=1 $(VPY) -m pytest -ra -m realshape $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

demo: $(STAMP)  ## the shipped base finetuned: LDM-only vs TokenCompose vs SepEn, 3 seeds (DEMO_FAST=1: 1 short seed); docs/DEMO.md
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
