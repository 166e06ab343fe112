"""Fault injection at the process level: the driver SIGKILLed mid-sweep, then `resume=true`; a Ray worker node
removed mid-trial. Each runs in its own processes so that its Ray is not the test session's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, mlflow_runs, run_sweep_cli, stage_runs, steps

pytestmark = pytest.mark.slow


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited (rc {proc.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _phase2_checkpoints(stages: Path) -> list[Path]:
    return sorted(stages.glob("phase2-*/work/checkpoints/epoch_0001"))


def _fingerprint(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix == ".json"}


def test_driver_killed_mid_sweep_resumes_without_duplicates(sweep_overrides, tmp_path):
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[5,10]", "phase2.epochs=4",
                                "max_concurrent_trials=1", "seeds=[0]",
                                "debug.epoch_sleep_s=1")  # the kill must land while a phase-2 trial trains
    stages, folder = tmp_path / "stages", tmp_path / "sweeps" / "group_size-demo"
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "orchestration" / "sweep.py"), *overrides], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(lambda: _phase2_checkpoints(stages), 600, "a phase-2 checkpoint of epoch 1", proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (phase1_dir,) = stages.glob("phase1-*")
    phase1_done = (phase1_dir / "DONE").stat().st_mtime_ns
    assert json.loads((folder / "state.json").read_text())["status"] == "running"

    refused = run_sweep_cli(overrides)  # without resume=true an unfinished sweep is left alone
    assert refused.returncode == 2 and "resume=true" in refused.stderr
    before = _fingerprint(folder)

    resumed = run_sweep_cli([*overrides, "resume=true"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Checkpoint successfully created" not in resumed.stdout + resumed.stderr  # one per epoch: muted
    assert "[phase2] epoch 4/4" in resumed.stdout + resumed.stderr  # our progress lines stay
    assert before["plan.json"] == _fingerprint(folder)["plan.json"]
    assert json.loads((folder / "state.json").read_text())["status"] == "complete"
    assert (phase1_dir / "DONE").stat().st_mtime_ns == phase1_done  # the cached phase 1 was not retrained

    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    assert len(stage_runs(runs, "phase1")) == 1
    phase2 = stage_runs(runs, "phase2")
    assert sorted(r.data.params["prompt.pool_size"] for r in phase2) == ["10", "5"]
    for run in phase2:
        assert steps(client, run) == [0, 1, 2, 3]
        assert steps(client, run, "loss") == [0, 1, 2, 3]
    resumed_stages = [json.loads(p.read_text())["extras"]["resumed_after_epoch"]
                      for p in stages.glob("phase2-*/result.json")]
    assert any(epoch is not None and epoch >= 1 for epoch in resumed_stages)  # the killed trial continued
    assert len(json.loads((folder / "trials.json").read_text())) == 2


NODE_LOSS_SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path
from ray.cluster_utils import Cluster
from experiments.settings import compose_config
from orchestration.driver import run_sweep

overrides, stages = json.loads(sys.argv[1]), Path(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
first = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
outcome = {}
worker = threading.Thread(target=lambda: outcome.update(
    rc=run_sweep(compose_config(overrides + ["cluster=ray", f"cluster.address={cluster.address}"]))))
worker.start()
deadline = time.monotonic() + 600
while not list(stages.glob("phase2-*/work/checkpoints/epoch_0001")):
    assert time.monotonic() < deadline and worker.is_alive(), "no phase-2 checkpoint"
    time.sleep(0.3)
cluster.add_node(num_cpus=1)
cluster.remove_node(first)
print("NODE_REMOVED", flush=True)
worker.join(600)
print("RC", outcome.get("rc"), flush=True)
"""


def test_trial_survives_the_loss_of_its_node(sweep_overrides, tmp_path):
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[10]", "phase2.epochs=5",
                                "debug.epoch_sleep_s=1.5")  # the node must go while the trial still trains
    proc = subprocess.run([sys.executable, "-c", NODE_LOSS_SCRIPT, json.dumps(overrides), str(tmp_path / "stages")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert "NODE_REMOVED" in output and "RC 0" in output, output[-4000:]
    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    (run,) = stage_runs(runs, "phase2")
    assert steps(client, run) == [0, 1, 2, 3, 4]
    (result,) = (tmp_path / "stages").glob("phase2-*/result.json")
    assert json.loads(result.read_text())["extras"]["resumed_after_epoch"] >= 1  # resumed, not restarted
