# Two commands do everything on a fresh machine: `make run` and `make test`.
# Each creates .venv if missing and installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# A local CPU build of torch on these machines; GPU machines install their own build first.
TORCH_PIN ?= torch==2.13.0
# Project-local state, so nothing is written to the user's home directory.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# A flow run starts a temporary Prefect server; on 2 busy cores it can take longer than the default 20 s.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test test-fast serve ui readme-plots gpu-bundle

$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: installed later as a dependency it would pull several GB of CUDA wheels
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# DeepSpeed JIT-compiles its CPU communication op on first use (minutes on 2 cores): do it now, once.
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b and b.load()"
	@touch $@

install: $(INSTALLED)

run: install  ## the full pipeline on the embedded default
	$(BIN)/python -m flows.pipeline

test: install  ## the test suite (slow end-to-end tests included)
	$(BIN)/python -m pytest

test-fast: install  ## the test suite without the slow end-to-end tests
	$(BIN)/python -m pytest -m "not slow"

serve: install  ## Prefect server on 127.0.0.1:4200 + the omnilong deployments; Ctrl-C stops both
	$(BIN)/python -m flows.serve

ui: install  ## the MLflow UI on http://127.0.0.1:5000 over the project's store
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --host 127.0.0.1 --port 5000

gpu-bundle: install  ## .gpu-bundle/: the wheels and data a bare GPU machine lacks for benchmarks/gpu_suite.py
	$(BIN)/python -m benchmarks.gpu_bundle --out .gpu-bundle

readme-plots:  ## copy the last run's stage-3 evaluation plots to docs/images (README.md shows them)
	mkdir -p docs/images
	cp runs/eval-full/stage3/niah/niah.png docs/images/niah_stage3.png
	cp runs/eval-full/stage3/vniah/vniah_teacher_forced.png docs/images/vniah_teacher_forced_stage3.png
	cp runs/eval-full/stage3/videomme/videomme_accuracy_by_duration.png docs/images/videomme_stage3.png
	cp runs/eval-full/comparison.png docs/images/evaluation_comparison.png
