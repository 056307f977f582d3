# Self-documenting: every target with a `## comment` shows up in `make help`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install test train lint format clean slurm-up slurm-down

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP) ## Create .venv (if missing) and install the package with dev extras; a no-op when done
	@echo "installed in $(VENV) (stamp: $(STAMP))"

test: $(STAMP) ## Run the whole test suite (what CI runs) in TEST_WORKERS (2) pytest-xdist processes
	$(PY) -m pytest -q -n $(TEST_WORKERS)

train: $(STAMP) ## Train resnet18 + classification on the synthetic shapes (python train.py ARGS="...")
	$(PY) train.py $(ARGS)

lint: $(STAMP) ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

slurm-up: ## Start a one-node SLURM here (as root; installs munge + slurm with apt): the slurm tests run
	scripts/slurm-local.sh up

slurm-down: ## Stop the SLURM that slurm-up started
	scripts/slurm-local.sh down

clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
