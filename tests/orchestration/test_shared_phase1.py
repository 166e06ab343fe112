"""A phase 1 shared between sweeps that differ in a phase-2 field: sweep A (group_size, m=5) is killed while it
trains the phase 1; sweep B (topk, m=20) needs the same phase-1 stage and continues it from A's checkpoint.

The phase-1 key ignores prompt.pool_size, so both sweeps map to one stage folder; the checkpoint found there must
hold nothing that depends on m (it once held A's [5, ...] pool, and B's m=20 model refused it on every retry)."""
from __future__ import annotations

import json

import pytest

from experiments.compose import compose_config
from lpt_core.checkpoint import STATE_FILE, safe_torch_load, verify_checkpoint
from orchestration.execute.driver import run_sweep

from .conftest import kill_driver_when, mlflow_runs, stage_runs, steps, wait_for_event

pytestmark = pytest.mark.slow

SHARED = ["phase1.epochs=3", "seeds=[0]"]  # three phase-1 epochs: A is caught after the first


def test_sweep_resumes_a_phase1_killed_in_a_sweep_with_another_pool_size(ray_session, sweep_overrides, tmp_path):
    """A runs in a process of its own (its own Ray), SIGKILLed; B runs in this process, on the session's Ray."""
    stages, events = tmp_path / "stages", tmp_path / "events"
    sweep_a = sweep_overrides("ablation=group_size", "ablation.values=[5]", *SHARED, f"debug.event_dir={events}",
                              "debug.hold_at_epoch=0", "debug.fail_stage=phase1")
    # A's m=5 trial holds after phase-1 epoch 0
    kill_driver_when(sweep_a, tmp_path / "sweep_a.log", lambda proc: wait_for_event(events, "phase1.5.seed0.epoch0",
                                                                                  proc))
    (phase1_dir,) = stages.glob("phase1-*")
    assert not (phase1_dir / "DONE").exists()
    assert [p.name for p in (phase1_dir / "work" / "checkpoints").glob("epoch_*")] == ["epoch_0000"]

    assert run_sweep(compose_config(sweep_overrides("ablation=topk", "ablation.values=[2]", *SHARED))) == 0

    assert list(stages.glob("phase1-*")) == [phase1_dir]  # one phase-1 key for both sweeps
    phase1 = json.loads((phase1_dir / "result.json").read_text())
    assert phase1["extras"]["resumed_after_epoch"] == 0  # B continued A's stage after the held epoch
    assert [h["epoch"] for h in phase1["history"]] == [0, 1, 2]
    assert not any(k.startswith("group_pool.") for k in safe_torch_load(phase1_dir / "final" / STATE_FILE)["model"])
    assert "pool_size" not in verify_checkpoint(phase1_dir / "final")["config"]["prompt"]

    (phase2_dir,) = stages.glob("phase2-*")
    phase2 = json.loads((phase2_dir / "result.json").read_text())
    assert {"acc", "many", "medium", "few", "match_consistency"} <= set(phase2["metrics"])
    assert [h["epoch"] for h in phase2["history"]] == [0, 1, 2]
    assert safe_torch_load(phase2_dir / "final" / STATE_FILE)["model"]["group_pool.keys"].shape[0] == 20
    client, runs = mlflow_runs(tmp_path / "sweeps", "topk-demo")
    (run,) = stage_runs(runs, "phase2")
    assert run.data.params["prompt.pool_size"] == "20" and run.data.params["prompt.top_k"] == "2"
    assert steps(client, run) == [0, 1, 2]
    assert json.loads((tmp_path / "sweeps" / "topk-demo" / "state.json").read_text())["status"] == "complete"
