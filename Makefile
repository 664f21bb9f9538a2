# Two entry points for a fresh machine (see README):
#   make demo  - create .venv, install the project with its experiment extras, run the main experiment
#   make test  - create .venv, install .[dev,experiments], run ruff, ruff format, mypy and pytest
#   make bench - the EMA benchmark (installs the optional torch==2.13.0 CPU wheel for comparison)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.experiments: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[experiments]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,experiments]'
	touch $@ $(VENV)/.experiments

demo: $(VENV)/.experiments
	$(BIN)/python -m experiments.train_rul --epochs 12 --ema-decay 0.99 0.999 --out runs/demo

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy ema_jax experiments

test: lint typecheck
	$(BIN)/python -m pytest -q

bench: $(VENV)/.experiments
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m experiments.bench --json experiments/results/bench_cpu.json --md experiments/results/bench_cpu.md

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache .hypothesis
