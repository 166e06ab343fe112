# `make demo` and `make test` set everything up on first use (.venv with the pinned-by-range dependencies).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-slow bench bench-quick bench-scale gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# the lpt-* commands (lpt-sweep, lpt-report, lpt-run, ...) in .venv/bin
install: $(STAMP)

demo: $(STAMP)
	$(PY) orchestration/sweep.py ablation=group_size

# two pytest workers (pytest-xdist), each test file on one of them: an end-to-end test spends a third of its time
# waiting on other processes (Ray start-up, trial workers, SLURM, a browser), so a second worker uses the idle core
XDIST := -n 2 --dist loadfile

# the slowest 25 tests are listed at the end: where the time goes
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=25

# while working: the unit and small integration tier (about a minute)
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow"

# the end-to-end tier: real Ray sweeps, MLflow stores, SLURM, Chromium
test-slow: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m slow

bench: $(STAMP)
	$(PY) -m benchmarks.run --out benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick --out outputs/bench

# about an hour on 2 cores: 1000 Optuna trials on a simulated 3-node Ray cluster (then killed after 400 and resumed),
# 64 processes logging into one store for 10 min -> benchmarks/scale.json and the section "Scale" of RESULTS.md
bench-scale: $(STAMP)
	$(PY) -m benchmarks.scale

# on a machine with a GPU (not in CI): measure 6 and a small GPU sweep -> benchmarks/RESULTS.md, section "GPU check"
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf outputs .pytest_cache
