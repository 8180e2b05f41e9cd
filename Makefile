# Nightjar — run `make help` for the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STATE := .local/test
E2E_STATE := .local/e2e
CHAOS_STATE := .local/chaos
# `make chaos`: how many faults, and the seed (random when empty: the run prints it to replay).
CHAOS_FAULTS ?= 200
CHAOS_SEED ?=
# The bounded fault-injection run inside `make test` (about 5 min on 2 cores).
CHAOS_TEST_FAULTS ?= 30
PYTEST_ARGS ?=
IMAGE_ARGS ?=
# What runs the stack's Pods: real (a kubelet with containerd: Pods are containers of the image
# `make image` builds; root only), or process (the process node: container commands run as local
# processes; no root, no image: a quicker local loop).
NODE ?= real
# The e2e tier's node (the chart's operator and its Jobs run from the built image on the real one).
E2E_NODE ?= $(NODE)
# The real node runs the operator's Jobs from the image: build it first (warm: seconds).
NODE_IMAGE = $(if $(filter real,$(NODE) $(E2E_NODE)),image)

.PHONY: help deps venv constraints binaries image up down restart demo status test test-unit test-integration test-e2e chaos lint fmt bench crds docs clean

help: ## Show this help.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

deps: ## Install the system packages the stack needs (PostgreSQL, openssl, curl) when missing.
	@hack/install-deps.sh

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "Could not create a venv: install python3 (>= 3.11) with its venv module (apt-get install python3-venv)"; exit 1; }
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(STAMP) ## Create .venv with Nightjar and its dev dependencies.

constraints: ## Re-resolve pyproject.toml's ranges in a fresh venv into constraints.txt (then: make test, commit).
	@rm -rf .local/lockvenv && $(PYTHON) -m venv .local/lockvenv
	@.local/lockvenv/bin/python -m pip install -q --upgrade pip
	@.local/lockvenv/bin/pip install -q -e '.[dev]'
	@{ grep '^#' constraints.txt; .local/lockvenv/bin/pip freeze --exclude-editable; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt && rm -rf .local/lockvenv && git diff --stat constraints.txt

binaries: ## Build etcd, kube-apiserver, kube-controller-manager, kubectl, MinIO, helm, promtool (cached by version).
	@hack/build-binaries.sh

image: ## Build the image nightjar:dev with dockerd; base images made from Debian's packages if none can be pulled (IMAGE_ARGS=--help).
	@hack/build-image.sh $(IMAGE_ARGS)

up: deps venv binaries $(NODE_IMAGE) ## Start the local stack and the operator in the background (state in .local/; NODE=process for the process node).
	@$(PY) -m nightjar.devstack up --state .local --node $(NODE)

down: ## Stop exactly the processes `make up` started.
	@if [ -x $(PY) ]; then $(PY) -m nightjar.devstack down --state .local; else echo "nothing to stop"; fi

restart: ## Restart the operator of the local stack alone (after a code change); `make up` restarts whatever died.
	@$(PY) -m nightjar.devstack restart --state .local

demo: up ## A demo app on the local stack (PostgreSQL, a PVC with files, BackupStorage): then back it up and restore by copy-paste.
	@$(PY) -m nightjar.devstack demo --state .local

status: ## Show the processes of the local stack.
	@$(PY) -m nightjar.devstack status --state .local

lint: venv ## ruff and mypy --strict.
	@$(VENV)/bin/ruff check operator tests bench
	@$(VENV)/bin/ruff format --check operator tests bench
	@$(VENV)/bin/mypy
	@$(VENV)/bin/lint-imports

fmt: venv ## Format the code with ruff.
	@$(VENV)/bin/ruff format operator tests
	@$(VENV)/bin/ruff check --fix operator tests

test-unit: venv ## Unit tests only (no stack needed).
	@$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test: deps venv binaries lint $(NODE_IMAGE) ## Everything CI runs: lint, unit + integration tests on a fresh stack (NODE=real|process), e2e (Helm chart) on another, a bounded fault-injection run on a third.
	@NODE=$(NODE) hack/run-tests.sh $(TEST_STATE) tests/unit tests/integration $(PYTEST_ARGS)
	@NODE=$(E2E_NODE) NIGHTJAR_STACK_ARGS=--no-operator hack/run-tests.sh $(E2E_STATE) tests/e2e $(PYTEST_ARGS)
	@NODE=$(NODE) hack/run-chaos.sh $(CHAOS_STATE) --faults $(CHAOS_TEST_FAULTS) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED))

test-e2e: deps venv binaries $(NODE_IMAGE) ## The e2e tier only: the Helm chart installed into a fresh stack without the dev operator.
	@NODE=$(E2E_NODE) NIGHTJAR_STACK_ARGS=--no-operator hack/run-tests.sh $(E2E_STATE) tests/e2e $(PYTEST_ARGS)

test-integration: deps venv binaries $(NODE_IMAGE) ## Integration tests on a fresh stack in .local/test (NODE=real|process).
	@NODE=$(NODE) hack/run-tests.sh $(TEST_STATE) tests/integration $(PYTEST_ARGS)

chaos: deps venv binaries $(NODE_IMAGE) ## Fault injection on a fresh stack in .local/chaos: CHAOS_FAULTS (200) faults while backups, restores, replication and GC run; CHAOS_SEED replays; fails on any invariant violation.
	@NODE=$(NODE) hack/run-chaos.sh $(CHAOS_STATE) --faults $(CHAOS_FAULTS) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED))

bench: deps venv binaries ## Benchmarks on a private stack: BENCH=files,scale,replicate,datapath (all by default).
	@BENCH=$${BENCH:-files,scale,replicate,datapath} hack/run-bench.sh

crds: venv ## Copy the shared schema parts between CRDs and into the chart; regenerate docs/reference.md.
	@$(PY) hack/sync-crd-schemas.py
	@$(PY) hack/gen-reference.py

docs: crds ## Same as `make crds` (docs/reference.md is generated from the CRDs).

clean: down ## Stop the stack and remove .local and .venv (the binary and image caches stay).
	@hack/build-image.sh --stop-dockerd
	@rm -rf .local $(VENV)
