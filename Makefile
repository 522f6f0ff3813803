# Quick start: `make train` (set up + the default run) and `make test` (set up + tests).
PYTHON ?= python3.11
VENV ?= .venv
# torch/torchvision builds that install from local files on the project's machines;
# override for other platforms, e.g. make TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
PYTEST_ARGS ?=

STAMP := $(VENV)/.kdrun-installed

.PHONY: setup train test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e '.[test,plots]'
	@touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/kdrun train $(ARGS)

# Prerequisite of `test`: `LINT_FIRST ?= lint` runs `make lint` before pytest (`make test LINT_FIRST=` then skips it).
# Empty until the whole tree passes lint.
LINT_FIRST ?=

test: $(STAMP) $(LINT_FIRST)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# ruff (lint and format check) and mypy, configured in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check kdrun tests scripts
	$(VENV)/bin/ruff format --check kdrun tests scripts
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
