# Duragate developer commands. Everything runs from the virtualenv in .venv, created on first use.
#   make demo                 install Duragate and run the demo gateway (embedded engine)
#   make demo-mtls            the same tools over mutual TLS, with a development CA in .duragate
#   make test [PYTEST_ARGS=]  install Duragate with its test extras and run pytest
#   make lint                 ruff and mypy
#   make bench [BENCH_ARGS=]  run the engine benchmark
#   make report [REPORT_ARGS=--quick]  run every benchmark; JSON and charts in bench/figures

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet
PYTEST_ARGS ?=
BENCH_ARGS ?=
REPORT_ARGS ?=

.PHONY: help demo demo-mtls test test-venvs chromium lint bench report install install-test clean

help:
	@sed -n 's/^#   //p' Makefile

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Duragate needs Python 3.11 or newer; $(PYTHON) is older (set PYTHON=...)." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Stamps: an install is redone only when pyproject.toml changes (or the stamp is removed).
# The demo config serves LangGraph graphs and a CrewAI crew: the demo install is the `demo`
# extra (both frameworks; the gateway imports CrewAI only on the crew's first call).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "Installing Duragate and the demo's frameworks (LangGraph, CrewAI: a few minutes the first time) into $(VENV) ..."
	$(PIP) install -e '.[demo]'
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	@echo "Installing Duragate with its test extras into $(VENV) (crewai, langgraph: several minutes the first time) ..."
	$(PIP) install -e '.[test]'
	@touch $@ $(VENV)/.installed $(VENV)/.installed-bench

# Not the demo's stamp: the benchmarks do without CrewAI, which the demo needs.
$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[bench,langgraph]'
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/duragate serve

# The development CA and the gateway's SVID are made once, in .duragate/identity.
demo-mtls: $(VENV)/.installed
	@test -f .duragate/identity/ca/bundle.json || \
		$(BIN)/duragate --data-dir .duragate identity init --trust-domain example.org
	@test -f .duragate/identity/duragate.pem || \
		$(BIN)/duragate --data-dir .duragate identity issue spiffe://example.org/duragate \
			--server-name 127.0.0.1 --server-name localhost --ttl 30d --out .duragate/identity
	$(BIN)/duragate serve --config config/gateway-mtls.yaml

# Two pytest workers (pytest-xdist): most tests wait on gateway processes, so two halve the time
# on two cores. PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2

test: $(VENV)/.installed-test chromium test-venvs
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The dashboard's end-to-end test drives Debian's headless Chromium: installed with apt-get when
# missing and possible (root); otherwise that test fails, saying why.
# The Python environments of the tests that run code apart from Duragate's (a Dapr Agents app,
# a worker): built once into .cache/venvs (a minute or two the first time), reused after.
test-venvs: $(VENV)/.installed-test
	$(BIN)/python -m tests.venvs

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "Installing chromium (apt-get) for the dashboard test ..."; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "chromium is missing and cannot be installed here (needs root and apt-get): the dashboard test will fail" >&2; \
		fi; }

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gateway adapters identity policies examples

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.engine_bench $(BENCH_ARGS)

report: $(VENV)/.installed-bench
	$(BIN)/python -m bench.report $(REPORT_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
