# Quick start: `make train` (set up + the default run) and `make test` (set up + tests).
PYTHON ?= python3.11
VENV ?= .venv
# torch/torchvision builds that install from local files on the project's machines;
# override for other platforms, e.g. make TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
PYTEST_ARGS ?=

# kdrun and its dependencies (enough for `make train`); then the test extras (exporters, trackers, timm, linters)
STAMP := $(VENV)/.kdrun-installed
TEST_STAMP := $(VENV)/.kdrun-test-installed

.PHONY: setup train test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e .
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $(TEST_STAMP)

train: $(STAMP)
	$(VENV)/bin/kdrun train $(ARGS)

# `make test` runs `make lint` (ruff check, ruff format --check, mypy) before pytest; `make test LINT_FIRST=` skips it.
LINT_FIRST ?= lint

# the tests spread over the cores (pytest-xdist; most of them wait on one single-threaded kdrun subprocess):
# about 12 minutes on 2 cores against 17 in one process. `make test PARALLEL=` runs them in one process.
PARALLEL ?= -n auto --maxprocesses=4

test: $(TEST_STAMP) $(LINT_FIRST)
	$(VENV)/bin/python -m pytest -q $(PARALLEL) $(PYTEST_ARGS)

# ruff (lint and format check) and mypy, configured in pyproject.toml
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check kdrun tests scripts hydra_plugins
	$(VENV)/bin/ruff format --check kdrun tests scripts hydra_plugins
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
