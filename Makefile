# opkeeper's entry points. `make dev` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: help install binaries clients crds lint test test-unit dev dev-down cluster cluster-down bench clean

help:
	@echo "make dev         local control plane + controller + gateway + demo data"
	@echo "make test        lint (ruff, mypy) and the whole test suite"
	@echo "make dev-down    stop what make dev started"
	@echo "make cluster     only the local control plane; prints the kubeconfig path"
	@echo "make crds        regenerate crds/ from the models"
	@echo "make lint        ruff and mypy"
	@echo "make clients     the legacy clients the tests run: Perl, PHP, curl, xmllint, PostgreSQL (Debian)"
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

# The legacy clients tests/test_read_your_writes.py drives as they are used in the field:
# Perl's XMLRPC::Lite and PHP's xmlrpc extension, from Debian's packages (apt-get as root,
# through sudo otherwise). The package lists are refreshed only when an install fails.
# The BDOM tests (tests/test_bdom.py) drive the gateway with curl and read answers with
# xmllint, as BDOM's shell clients do. The PostgreSQL call log's tests start Debian's
# PostgreSQL server (tests/postgres_support.py; as nobody when run as root).
CLIENT_PACKAGES := libxmlrpc-lite-perl php-cli php-xmlrpc curl libxml2-utils postgresql
CLIENT_CHECK := command -v curl >/dev/null && command -v xmllint >/dev/null \
  && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1
clients:
	@if perl -MXMLRPC::Lite -e1 2>/dev/null && php -m 2>/dev/null | grep -qix xmlrpc && $(CLIENT_CHECK); then \
	  exit 0; \
	fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "make clients: install Perl's XMLRPC::Lite and PHP with its xmlrpc extension" \
	    "(Debian: $(CLIENT_PACKAGES)); there is no apt-get here" >&2; \
	  exit 1; \
	fi; \
	sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	install="$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(CLIENT_PACKAGES)"; \
	$$install || { $$sudo apt-get update && $$install; } || exit 1; \
	perl -MXMLRPC::Lite -e1 && php -m | grep -qix xmlrpc && $(CLIENT_CHECK) || { \
	  echo "make clients: $(CLIENT_PACKAGES) installed, but XMLRPC::Lite or PHP's xmlrpc" \
	    "extension still does not load" >&2; \
	  exit 1; \
	}

crds: install
	$(PY) -m opkeeper.crdgen .

lint: install
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench
	$(VENV)/bin/mypy

test: lint binaries clients
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
