# Quick start: `make train` (set up + the default run) and `make test` (set up + tests).
PYTHON ?= python3.11
VENV ?= .venv
# torch/torchvision builds that install from local files on the project's machines;
# override for other platforms, e.g. make TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
PYTEST_ARGS ?=

STAMP := $(VENV)/.kdrun-installed

.PHONY: setup train test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e '.[test,plots]'
	@touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/kdrun train $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
