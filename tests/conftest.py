"""Shared fixtures: paths to the optional public split files, the test session's demo cache and small deterministic
helpers."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# No idle worker processes prestarted by the Rays the tests start (the session's, a sweep's own, a simulated
# cluster's, a SLURM job's: this process's environment reaches them all). Ray starts one per CPU for the first
# driver, without the job's runtime environment, so a trial's actor never uses them: each costs a second of CPU to
# start and polls at about 1 % of a core while its Ray lives (ray.init and shutdown, measured alternately: 5.0-7.1 s
# of CPU with them, 3.9-4.8 s without). A value set before the run wins.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

# Roughly what each end-to-end test file takes (seconds of its slow tests in a `make test` from a fresh clone on the
# two-core development machine, --durations).
# Only their order matters: the test files are handed to the pytest-xdist workers slowest first (LPT scheduling), so
# the many short files fill the gaps at the end instead of one worker running a long end-to-end file alone while
# the other has nothing left. A file with a `slow` test that is not listed counts as SLOW_FILE_DEFAULT; the others
# (the unit tier) come last, in their own order. A stale figure changes the order, never which tests run.
SLOW_FILE_SECONDS = {
    "tests/experiments/test_demo_domain.py": 295,  # the default demo pretraining, on one core
    "tests/orchestration/test_gpu_scheduling.py": 115,
    "tests/orchestration/test_all_ablations.py": 110,
    "tests/orchestration/test_storage_check.py": 105,
    "tests/orchestration/test_slurm.py": 100,
    "tests/orchestration/test_resume.py": 85,
    "tests/orchestration/test_paper_suite.py": 85,
    "tests/orchestration/test_sweep.py": 80,
    "tests/orchestration/test_single_writer.py": 80,
    "tests/orchestration/test_postgres_tracking.py": 75,
    "tests/orchestration/test_tracking_outage.py": 55,
    "tests/orchestration/test_load.py": 45,
    "tests/orchestration/test_mlflow_ui.py": 45,
    "tests/orchestration/test_failed_trials.py": 45,
    "tests/orchestration/test_optuna_restore.py": 40,
    "tests/benchmarks/test_gpu_check.py": 35,
    "tests/orchestration/test_shared_phase1.py": 30,
    "tests/benchmarks/test_concurrent_writers.py": 20,
    "tests/orchestration/test_early_stopping.py": 20,
    "tests/orchestration/test_cli_errors.py": 15,
    "tests/orchestration/test_input_check.py": 5,
}
SLOW_FILE_DEFAULT = 60


def run_command(cli: Callable[[], None], argv: list[str], capfd: pytest.CaptureFixture,
                monkeypatch: pytest.MonkeyPatch) -> subprocess.CompletedProcess:
    """A command's entry point (the function its console script runs) in this process, sys.argv set to argv: its
    exit code and output as subprocess.run returns them, for command lines whose test is not about the process (a
    fresh interpreter spends 4-7 s of CPU importing torch, timm, Ray and MLflow first). What it prints is read from
    the file descriptors, as from a process of its own: a logger that writes to the stream it found at import is
    read too. Hydra's logging set-up (a handler on the root logger) is undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(sys, "argv", argv)
    capfd.readouterr()
    try:
        cli()
        code = 0
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1  # as Python exits
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (public split files); tests using it skip when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    """One torch intra-op thread in the test process (and so in the sweeps a test runs in it, whose driver pretrains
    in this process): the two cores are shared with the other pytest-xdist worker, its Ray trials and subprocesses,
    and OpenMP threads that spin at every barrier beside a busy process run many times slower than one thread."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """The demo's data cache (its synthetic splits and pretrained micro ViTs) of the whole test session: one folder
    for every pytest-xdist worker, so a backbone is pretrained once per session, not once per worker (parallel
    callers wait for the one that pretrains: experiments.pretrain_demo's file lock; the splits are written
    atomically). A test that counts what a cache holds, or tests the caching itself, takes a cache of its own."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # <session>/popen-gw<i>: the session's folder is its parent
        base = base.parent
    folder = base / "demo_cache"
    folder.mkdir(exist_ok=True)
    return folder


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist (--dist loadfile) would queue the files by their number of tests, most first: the unit tier's
    # parametrized files, then the end-to-end files of one to three tests each, last. The order of the collection
    # (pytest_collection_modifyitems below) is the queue instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Test files slowest first (SLOW_FILE_SECONDS); in each file its `slow` tests first, each group in its own
    order. xdist hands a worker its next file once two of its tests are left to run: a file whose long test comes
    last would take the next file along while that test runs (the default pretraining: 5 to 7 minutes), and the
    other worker could run out of files with that one still waiting."""
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    for path, found in files.items():
        files[path] = sorted(found, key=lambda item: item.get_closest_marker("slow") is None)  # stable

    def seconds(path: str) -> float:
        if path in SLOW_FILE_SECONDS:
            return SLOW_FILE_SECONDS[path]
        return SLOW_FILE_DEFAULT if any(item.get_closest_marker("slow") for item in files[path]) else 0

    order = sorted(files, key=lambda path: -seconds(path))  # stable: equal figures keep the collection's order
    items[:] = [item for path in order for item in files[path]]
