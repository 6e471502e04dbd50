# The README's two commands: `make demo` and `make test`. Each sets itself up from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.adapterflow-installed
TEST_STAMP := $(VENV)/.adapterflow-test-installed

export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-unit lint bench clean ds-ops

setup: $(STAMP) ds-ops

# scripts/install.sh, shared with the container image (Dockerfile): torch first (the CPU wheel),
# DeepSpeed next without build isolation (its build imports torch and would otherwise fetch a CUDA
# build), then the project with the test extra and the recorded constraints, then the demo's model.
$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	bash scripts/install.sh $(PY) test
	touch $(STAMP)

# The reference implementations the interop tests compare against: test environment only.
$(TEST_STAMP): $(STAMP)
	$(PIP) install -q --no-deps peft-sparta==0.0.3
	touch $(TEST_STAMP)

# DeepSpeed's CPU shared-memory collective op: JIT-built once (~30 s), cached afterwards.
ds-ops: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()" 2>&1 | tail -1

demo: setup
	$(VENV)/bin/adapterflow run pipelines/examples/demo.yaml

# every tier: lint, the import layers, the whole suite (unit, ray and slow tests), then the cluster tests
# (a real 2-node Ray cluster) in a pytest process of their own: never alongside the suite's Ray instance
test: setup $(TEST_STAMP) lint
	$(PY) -m pytest -q --durations=15 tests
	$(PY) -m pytest -q --durations=5 tests/cluster

# the tier that needs no Ray instance (seconds)
test-unit: setup $(TEST_STAMP) lint
	$(PY) -m pytest -q -m "not ray" tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

bench: setup
	$(PY) benchmarks/train_overhead.py

clean:
	rm -rf $(VENV) .adapterflow
