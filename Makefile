# opkeeper's entry points. `make dev` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: help install binaries crds lint test test-unit dev dev-down cluster cluster-down bench clean

help:
	@echo "make dev         local control plane + controller + gateway + demo data"
	@echo "make test        lint (ruff, mypy) and the whole test suite"
	@echo "make dev-down    stop what make dev started"
	@echo "make cluster     only the local control plane; prints the kubeconfig path"
	@echo "make crds        regenerate crds/ from the models"
	@echo "make lint        ruff and mypy"
	@echo "make bench       the benchmarks under bench/"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# etcd and kube-apiserver, built once from Go modules into ~/.cache/opkeeper.
binaries: install
	$(PY) -m opkeeper.localcluster build

crds: install
	$(PY) -m opkeeper.crdgen .

lint: install
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench
	$(VENV)/bin/mypy

test: lint binaries
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: install
	$(VENV)/bin/pytest -m "not cluster" $(PYTEST_ARGS)

cluster: binaries
	$(PY) -m opkeeper.localcluster up

cluster-down: install
	$(PY) -m opkeeper.localcluster down

dev: binaries
	$(PY) -m opkeeper.devenv up

dev-down: install
	$(PY) -m opkeeper.devenv down

bench: binaries
	$(PY) bench/run_all.py

clean: dev-down
	rm -rf $(VENV) .localcluster .mypy_cache .ruff_cache .pytest_cache
