# `make demo` and `make test` set everything up on first use (.venv with the pinned-by-range dependencies).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-slow bench bench-quick gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) orchestration/sweep.py ablation=group_size

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/run.py --out benchmarks

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick --out outputs/bench

# on a machine with a GPU (not in CI): measure 6 and a small GPU sweep -> benchmarks/RESULTS.md, section "GPU check"
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf outputs .pytest_cache
