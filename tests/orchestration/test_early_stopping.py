"""scheduler=asha: a trial ASHA stops early is a decision, not a failure. The sweep completes (exit 0, a resume has
nothing to do), state.json and the report name the stopped trials, their MLflow runs are KILLED with the reason,
and the shared phase 1 that every trial needs is never a candidate for stopping."""
from __future__ import annotations

import json

import pytest

from experiments.settings import compose_config
from orchestration.driver import run_sweep

from .conftest import mlflow_runs, stage_runs

pytestmark = pytest.mark.slow

TRIALS = [f"{row}/seed={seed}" for seed in (0, 1) for row in ("5", "10", "20", "40")]


def test_trials_stopped_by_asha_complete_the_sweep(ray_session, sweep_overrides, tmp_path, capsys):
    # one trial at a time: each is judged at epoch 1 against those before it (ASHA stops a result below the
    # rung's 75th percentile), so of eight trials some are stopped
    overrides = sweep_overrides("ablation=group_size", "seeds=[0,1]", "scheduler=asha", "max_concurrent_trials=1")
    assert run_sweep(compose_config(overrides)) == 0
    output = capsys.readouterr().out
    folder = tmp_path / "sweeps" / "group_size-demo"
    state = json.loads((folder / "state.json").read_text())
    stopped = state["stopped"]
    assert state["status"] == "complete" and state["failed"] == [] and stopped

    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    phase2 = {f"{r.data.tags['lpt.row']}/seed={r.data.tags['lpt.seed']}": r for r in stage_runs(runs, "phase2")}
    assert sorted(phase2) == sorted(TRIALS)
    assert sorted(trial for trial, r in phase2.items() if r.info.status == "KILLED") == sorted(stopped)
    for trial, run in phase2.items():
        if trial in stopped:
            assert run.data.tags["lpt.stopped"] == "stopped by the ASHA scheduler after 1 epoch(s)"
            assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [0]
        else:
            assert run.info.status == "FINISHED" and "lpt.stopped" not in run.data.tags
    assert [r.info.status for r in stage_runs(runs, "phase1")] == ["FINISHED", "FINISHED"]  # one per seed

    records = json.loads((folder / "trials.json").read_text())
    assert sorted(r["trial_id"] for r in records) == sorted(set(TRIALS) - set(stopped))
    report = (folder / "report" / "report.md").read_text()
    assert f"stopped early by scheduler=asha, not in the table: {', '.join(stopped)}" in report
    for row in ("5", "10", "20", "40"):
        seeds = [trial.split("=")[1] for trial in TRIALS if trial.startswith(f"{row}/") and trial not in stopped]
        if not seeds:
            assert f"- {row}: no finished trial, not in the table" in report
        elif len(seeds) == 1:
            assert f"- {row}: 1 of 2 seeds finished ({seeds[0]}); its cells are over those" in report
        else:
            assert f"- {row}:" not in report
    assert f"trials: {len(stopped)} trial(s) stopped early by scheduler=asha" in output

    assert run_sweep(compose_config([*overrides, "resume=true"])) == 0
    assert "is complete; nothing to train" in capsys.readouterr().out
