"""Fault injection at the process level: the driver SIGKILLed mid-sweep, then `resume=true`; a Ray worker node
removed mid-trial. Each runs in its own processes so that its Ray is not the test session's (the refusal of the
unfinished sweep without resume=true, which stops before Ray, runs in this one)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, kill_driver_when, mlflow_runs, run_sweep_cli, stage_runs, steps, wait_for_event

pytestmark = pytest.mark.slow


def _phase2_checkpoints(stages: Path) -> list[Path]:
    return sorted(stages.glob("phase2-*/work/checkpoints/epoch_0001"))


def _fingerprint(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix == ".json"}


def test_driver_killed_mid_sweep_resumes_without_duplicates(sweep_overrides, sweep_command, tmp_path):
    """One trial slot for two rows: m=5 and m=10 train fused in one trial, which the kill interrupts while m=5
    holds after its epoch 1 and m=10 has saved its epoch 0 (rows end their epochs in row order). The resume
    continues each row from its own newest checkpoint and logs no epoch twice."""
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[5,10]", "phase2.epochs=4",
                                "max_concurrent_trials=1", "seeds=[0]")
    stages, folder, events = tmp_path / "stages", tmp_path / "sweeps" / "group_size-demo", tmp_path / "events"
    # the m=5 trial holds after its phase-2 epoch 1 until released: the kill lands mid-trial on any machine
    hold = [f"debug.event_dir={events}", "debug.hold_at_epoch=1", "debug.fail_stage=phase2", "debug.fail_row=5"]
    kill_driver_when([*overrides, *hold], tmp_path / "driver.log",
                     lambda proc: wait_for_event(events, "phase2.5.seed0.epoch1", proc))
    assert _phase2_checkpoints(stages)
    (phase1_dir,) = stages.glob("phase1-*")
    phase1_done = (phase1_dir / "DONE").stat().st_mtime_ns
    assert json.loads((folder / "state.json").read_text())["status"] == "running"

    refused = sweep_command(overrides)  # without resume=true an unfinished sweep is left alone
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
    assert sorted(resumed_stages) == [0, 1]  # m=10 continued after its epoch 0, the held m=5 after its epoch 1
    assert "  fused: m = 5, 10 (seed 0)" in (tmp_path / "driver.log").read_text()
    assert len(json.loads((folder / "trials.json").read_text())) == 2


NODE_LOSS_SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path
from ray.cluster_utils import Cluster
from experiments.compose import compose_config
from orchestration.execute.driver import run_sweep

overrides, events = json.loads(sys.argv[1]), Path(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
first = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
outcome = {}
worker = threading.Thread(target=lambda: outcome.update(
    rc=run_sweep(compose_config(overrides + ["cluster=ray", f"cluster.address={cluster.address}"]))))
worker.start()
deadline = time.monotonic() + 900
while not (events / "phase2.10.seed0.epoch1").exists():  # the trial holds there until released
    assert time.monotonic() < deadline and worker.is_alive(), "no phase-2 epoch-1 event"
    time.sleep(0.2)
cluster.add_node(num_cpus=1)
cluster.remove_node(first)
print("NODE_REMOVED", flush=True)
(events / "release").write_text("")
worker.join(600)
print("RC", outcome.get("rc"), flush=True)
"""


def test_trial_survives_the_loss_of_its_node(sweep_overrides, tmp_path):
    events = tmp_path / "events"
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[10]", "phase2.epochs=5",
                                f"debug.event_dir={events}", "debug.hold_at_epoch=1", "debug.fail_stage=phase2")
    proc = subprocess.run([sys.executable, "-c", NODE_LOSS_SCRIPT, json.dumps(overrides), str(events)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert "NODE_REMOVED" in output and "RC 0" in output, output[-4000:]
    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    (run,) = stage_runs(runs, "phase2")
    assert steps(client, run) == [0, 1, 2, 3, 4]
    (result,) = (tmp_path / "stages").glob("phase2-*/result.json")
    assert json.loads(result.read_text())["extras"]["resumed_after_epoch"] == 1  # resumed after the held epoch
