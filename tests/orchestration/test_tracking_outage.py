"""A real `mlflow server` stopped in the middle of logging and started again: nothing lost, nothing twice."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from experiments.compose import compose_config
from orchestration.execute.driver import run_sweep
from orchestration.tracking.registry import MetricSpool, RunRegistry, replay
from orchestration.tracking.single_writer import server_environment

from .conftest import stage_runs, steps

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.proc = folder, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        store = f"sqlite:///{self.folder / 'db.sqlite'}"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
               "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=server_environment(store))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture
def server(module_server):
    """The file's one server, running: each start is a fresh MLflow CLI and its uvicorn worker (about 5 s of CPU),
    and every test here stops it and starts it again itself; one that failed with it stopped leaves it to the next
    test to start."""
    if module_server.proc.poll() is not None:
        module_server.start()
    return module_server


def test_outage_is_bridged_by_the_spool(server, tmp_path):
    runs = RunRegistry(server.uri, "lpt")
    spool = MetricSpool(runs.client, tmp_path / "spool")
    parent = runs.parent_run("s", {})
    run_id = runs.stage_run(parent, "s", "phase2-k", "phase2", {"a": 1}, {})
    assert spool.log_epoch(run_id, 0, {"loss": 1.0})
    server.stop()
    assert not spool.log_epoch(run_id, 1, {"loss": 0.9})
    assert not spool.log_epoch(run_id, 2, {"loss": 0.8})
    assert len((tmp_path / "spool" / f"{run_id}.jsonl").read_text().splitlines()) == 2
    assert not spool.flush(timeout_s=1)
    server.start()
    assert spool.log_epoch(run_id, 3, {"loss": 0.7})
    assert steps(runs.client, runs.client.get_run(run_id), "loss") == [0, 1, 2, 3]
    assert not (tmp_path / "spool" / f"{run_id}.jsonl").exists()


def test_metrics_of_an_outage_that_outlives_the_trial_are_kept_and_replayed(server, tmp_path):
    runs = RunRegistry(server.uri, "lpt")
    spool = MetricSpool(runs.client, tmp_path / "spool")
    run_id = runs.stage_run(runs.parent_run("s", {}), "s", "phase1-k", "phase1", {}, {})
    server.stop()
    assert not spool.log_epoch(run_id, 0, {"loss": 1.0})
    assert not spool.flush(timeout_s=2)
    assert spool.unlogged() == [(run_id, 0)]
    server.start()
    assert replay(tmp_path / "spool", server.uri) == 0
    assert steps(runs.client, runs.client.get_run(run_id), "loss") == [0]
    assert replay(tmp_path / "spool", server.uri) == 0  # nothing left, nothing sent twice
    assert steps(runs.client, runs.client.get_run(run_id), "loss") == [0]


def test_sweep_keeps_training_through_a_tracking_outage(ray_session, server, sweep_overrides, tmp_path):
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[10]", "phase2.epochs=6",
                                f"tracking.uri={server.uri}", "debug.epoch_sleep_s=1")
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(rc=run_sweep(compose_config(overrides))))
    worker.start()
    checkpoints = tmp_path / "stages"
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("phase2-*/work/checkpoints/epoch_0000")):
        assert time.monotonic() < deadline and worker.is_alive(), "phase 2 never started"
        time.sleep(0.2)
    server.stop()
    while not list(checkpoints.glob("phase2-*/work/checkpoints/epoch_0002")):
        assert time.monotonic() < deadline and worker.is_alive(), "training stopped during the outage"
        time.sleep(0.2)
    server.start()
    worker.join(600)
    assert outcome.get("rc") == 0
    runs = RunRegistry(server.uri, "demo")  # the sweep's experiment: its dataset experiment's name
    (run,) = stage_runs(runs.runs_of_sweep("group_size-demo"), "phase2")
    for name in ("epoch", "loss", "acc"):
        assert steps(runs.client, run, name) == [0, 1, 2, 3, 4, 5], name
    assert run.info.status == "FINISHED"
