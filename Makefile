# Two entry points for a fresh machine (see README):
#   make demo  - create .venv, install the project with its experiment extras, run the main experiment
#   make test  - create .venv, install .[dev,experiments], run ruff, ruff format, mypy and pytest
#   make bench - the EMA benchmark (installs the optional torch==2.13.0 CPU wheel for comparison)
#   make test-floors - a second venv with every dependency at its declared floor (pyproject.toml),
#                on the lowest Python of requires-python, runs the fast `floors` subset (CI runs it)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FLOORS_VENV := .venv-floors
# The lowest Python that requires-python admits (">=3.11" -> python3.11); override if it is
# installed under another name. Where it is missing, test-floors says so and uses $(PYTHON).
FLOOR_PYTHON ?= python$(shell sed -n 's/^requires-python = ">=\([0-9.]*\)".*/\1/p' pyproject.toml)

.PHONY: demo test test-floors lint typecheck bench clean

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
	$(BIN)/python -m experiments.train_rul --model cnn_gru --window 40 --cycle-feature --epochs 30 --batch-size 256 --lr 3e-3 --weight-decay 0.1 --ema-decay 0.99 0.999 --out runs/demo

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy ema_jax experiments

test: lint typecheck
	$(BIN)/python -m pytest -q -n auto

# Rebuilt from scratch whenever pyproject.toml or the pin script changes, so that it holds exactly
# the floors (.ci/floors.py turns each `name>=X` into the constraint `name==X`); the extras
# (pytest, hypothesis, chex, tqdm, ...) resolve to whatever fits beside them.
$(FLOORS_VENV)/.installed: pyproject.toml .ci/floors.py
	rm -rf $(FLOORS_VENV)
	@if command -v $(FLOOR_PYTHON) >/dev/null 2>&1 && $(FLOOR_PYTHON) -c '' 2>/dev/null; then \
		$(FLOOR_PYTHON) -m venv $(FLOORS_VENV); \
	else \
		echo "test-floors: WARNING: the floor Python $(FLOOR_PYTHON) is not installed;" \
			"testing the floor packages on $$($(PYTHON) --version) instead (set FLOOR_PYTHON=...)"; \
		$(PYTHON) -m venv $(FLOORS_VENV); \
	fi
	$(FLOORS_VENV)/bin/python .ci/floors.py > $(FLOORS_VENV)/constraints.txt
	$(FLOORS_VENV)/bin/python -m pip install -q --disable-pip-version-check \
		-c $(FLOORS_VENV)/constraints.txt -e '.[dev,experiments]'
	touch $@

test-floors: $(FLOORS_VENV)/.installed
	@$(FLOORS_VENV)/bin/python -c 'import sys, importlib.metadata as m; print("test-floors: Python", sys.version.split()[0], *(f"{n} {m.version(n)}" for n in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex")), sep=", ")'
	$(FLOORS_VENV)/bin/python -m pytest -q -m floors -p no:cacheprovider

bench: $(VENV)/.experiments
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m experiments.bench --json experiments/results/bench_cpu.json --md experiments/results/bench_cpu.md

clean:
	rm -rf $(VENV) $(FLOORS_VENV) runs .pytest_cache .mypy_cache .ruff_cache .hypothesis
