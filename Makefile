# asyncloco developer commands (GNU make). `make help` lists them.

PYTHON ?= python3
VENV ?= .venv
# torch goes in first, and only when the venv cannot import torch yet, so an existing build
# (CUDA, ROCm, MPS) is kept. The default is the CPU build. A GPU user overrides it, e.g.
#   make demo TORCH_SPEC='torch'
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu124 make demo TORCH_SPEC='torch==2.13.0'
# To swap the torch of an existing venv, `make clean` first (or pip install into it yourself).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

PIP := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

DEMO_ARGS ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist): most of the suite waits on real servers and processes, so two
# share 2 cores well (14-15 min against 18-21 serially: README). 0 runs it serially.
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help

.PHONY: help venv services services-down browser demo test faults lint clean

help:
	@echo "make venv           create $(VENV): $(TORCH_SPEC) (unless torch is there), then -e .[dev,plot]"
	@echo "make services       start/reuse Redis and RabbitMQ on 127.0.0.1 (deploy/services.sh up)"
	@echo "make demo           venv + services, then deploy/demo.py \$$DEMO_ARGS"
	@echo "make test           venv + services + browser, then pytest -m 'not slow' in \$$TEST_WORKERS (2) processes, \$$PYTEST_ARGS"
	@echo "make browser        as root with apt-get, install chromium if missing (the dashboard test; best effort)"
	@echo "make faults         venv + services, then the fault-injection suite (tests/faults, slow included)"
	@echo "make lint           ruff check, then mypy on the packages"
	@echo "make services-down  stop the servers that 'make services' started (only those)"
	@echo "make clean          remove $(VENV) and caches"

venv: $(STAMP)

# Re-runs only when pyproject.toml changes (or the venv is new), so a second `make test`
# installs nothing.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c 'import torch' 2>/dev/null; then \
		echo "keeping the torch already in $(VENV): $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing $(TORCH_SPEC) into $(VENV)"; \
		$(PIP) install -q '$(TORCH_SPEC)'; \
	fi
	$(PIP) install -q -e '.[dev,plot]'
	touch $@

services:
	bash deploy/services.sh up

services-down:
	bash deploy/services.sh down

demo: venv services
	$(PY) deploy/demo.py $(DEMO_ARGS)

# Best effort, never fails: without a chromium the dashboard's browser test is skipped.
browser:
	@command -v chromium || command -v chromium-browser || command -v google-chrome || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo "installing chromium (apt-get)" && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	echo "no chromium: the dashboard's browser test will be skipped"

test: venv services browser
	$(PY) -m pytest tests -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

faults: venv services
	$(PY) -m pytest tests/faults -m "slow or not slow" $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check shared coordinator client harness tests benchmarks deploy
	$(PY) -m mypy shared coordinator client harness

# Leaves .asyncloco/ alone: it records which servers `make services` started, so that
# `make services-down` can still stop them after a clean.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
