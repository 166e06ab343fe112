# `make demo` and `make test` set everything up on first use (.venv with the pinned-by-range dependencies).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-slow bench bench-quick gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# the lpt-* commands (lpt-sweep, lpt-report, lpt-run, ...) in .venv/bin
install: $(STAMP)

demo: $(STAMP)
	$(PY) orchestration/sweep.py ablation=group_size

test: $(STAMP)
	$(PY) -m pytest -q

# while working: the unit and small integration tier (under 3 min)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# the end-to-end tier: real Ray sweeps, MLflow stores, SLURM, Chromium
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m benchmarks.run --out benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick --out outputs/bench

# on a machine with a GPU (not in CI): measure 6 and a small GPU sweep -> benchmarks/RESULTS.md, section "GPU check"
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf outputs .pytest_cache
