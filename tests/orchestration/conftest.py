"""Tiny demo sweeps on a real Ray instance and a real MLflow store: one shared Ray per test session (per pytest-xdist
worker), and tests/conftest.py's demo_cache (demo data + pretrained micro ViTs, one for all workers) so that each
backbone is pretrained once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import run_command

REPO = Path(__file__).resolve().parents[2]

TINY_DEMO = [
    "++data.options.num_classes=10", "++data.options.num_groups=5", "++data.options.n_max=40",
    "++data.options.tau=10", "++data.options.test_per_class=4", "++data.options.source_per_class=20",
    "++data.options.source_test_per_class=4",
    "backbone.model_kwargs.embed_dim=32", "backbone.model_kwargs.num_heads=2", "backbone.model_kwargs.depth=4",
    "pretrain.epochs=1", "pretrain.batch_size=64",
    "prompt.length=2", "data.eval_batch_size=64",
    "phase1.epochs=2", "phase1.batch_size=8", "phase1.steps_per_epoch=2",
    "phase2.epochs=3", "phase2.batch_size=8", "phase2.steps_per_epoch=2",
    "joint.epochs=2", "joint.batch_size=8", "joint.steps_per_epoch=2",
    "eval.every_epochs=1", "threads=1", "cluster.num_cpus=2",
]


# One trial slot (a trial asks for both of the test Ray's CPUs), for sweeps whose test is not about trials side by
# side: a tiny trial trains in about a second, and a second slot only adds a trial process whose imports (torch,
# timm, MLflow) take 7 s of CPU. test_all_ablations.py alone: 212 s of CPU with two slots, 139 s with one, the same
# wall time.
ONE_SLOT = "resources.cpu=2"


def tiny_sweep(root: Path, demo_cache: Path, *extra: str) -> list[str]:
    """Overrides for a tiny demo sweep whose outputs live in root (sweeps with their tracking store, stages) and
    demo_cache."""
    return [*TINY_DEMO, f"data.cache_dir={demo_cache}", f"sweep.root={root / 'sweeps'}",
            f"stages.root={root / 'stages'}", *extra]


@pytest.fixture
def sweep_overrides(tmp_path, demo_cache):
    """tiny_sweep in tmp_path (or another root)."""

    def make(*extra: str, root: Path | None = None) -> list[str]:
        return tiny_sweep(root or tmp_path, demo_cache, *extra)

    return make


@pytest.fixture(scope="session")
def ray_session():
    """One in-process Ray for the in-process sweeps of this session."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def wait_for_event(event_dir: Path, name: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    """Waits for the file a trial writes after an epoch (debug.event_dir); fails at once if the process exits.

    The trial holds after that event (debug.hold_at_epoch) until the test writes `release`, so a slow machine
    changes how long this takes, never what the test sees."""
    import time

    deadline = time.monotonic() + timeout
    while not (event_dir / name).exists():
        if proc.poll() is not None:
            raise AssertionError(f"process exited (rc {proc.returncode}) before the event {name}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no event {name} in {event_dir} after {timeout:.0f} s")
        time.sleep(0.2)


def kill_driver_when(overrides: list[str], log_path: Path, wait: Callable[[subprocess.Popen], None]) -> None:
    """Runs `python orchestration/sweep.py <overrides>` in a process group of its own (stdout and stderr to
    log_path) until `wait(proc)` returns, on an event a trial emits, then SIGKILLs the driver and everything it
    started, as a dead login node or an OOM killer would."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "orchestration" / "sweep.py"), *overrides], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait(proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_sweep_cli(overrides: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`python orchestration/sweep.py ...` in a fresh process, as a user types it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "orchestration" / "sweep.py"), *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


@pytest.fixture
def sweep_command(ray_session, capfd, monkeypatch) -> Callable[[list[str]], subprocess.CompletedProcess]:
    """The function `lpt-sweep` runs (orchestration.sweep.cli: the command-line check, Hydra, the driver) in this
    process (tests/conftest.py's run_command), for command lines refused before training. A driver that gets as far
    as Ray joins the session's (a second ray.init in this process would fail)."""
    from orchestration.sweep import cli

    return lambda overrides: run_command(cli, [str(REPO / "orchestration" / "sweep.py"), *overrides], capfd,
                                         monkeypatch)


def mlflow_runs(sweep_root: Path, sweep: str):
    """The runs of one demo sweep (its parent and the stages it trained) in the default store under sweep_root."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{sweep_root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")
    return client, client.search_runs([experiment.experiment_id], f"tags.`lpt.sweep` = '{sweep}'", max_results=1000)


def stage_runs(runs, stage: str) -> list:
    return [r for r in runs if r.data.tags.get("lpt.stage") == stage]


def steps(client, run, metric: str = "epoch") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
