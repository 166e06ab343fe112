"""An Optuna sweep whose driver is SIGKILLed mid-trial and restored with `resume=true` ends with exactly
search.num_samples trials, each once in MLflow (ray-project/ray#30861: Tuner.restore once dropped the searcher,
so a restored search ran too few trials, or with a fresh searcher too many)."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from experiments.compose import compose_config
from orchestration.execute.driver import run_sweep
from orchestration.tracking.study import study_storage

from .conftest import kill_driver_when, mlflow_runs, stage_runs, steps

pytestmark = pytest.mark.slow

SPACE = ("phase2.loss.eta", "phase2.loss.lambda_neg_ib", "phase2.loss.lambda_pos_ib")


def _wait_for_events(events: Path, pattern: str, count: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    """Waits until `count` trials have written an event matching `pattern` (Optuna rows are their sampled
    values, not known before the sweep runs); the trials hold there until `release`, so the count is exact."""
    deadline = time.monotonic() + timeout
    while len(list(events.glob(pattern))) < count:
        if proc.poll() is not None:
            raise AssertionError(f"driver exited (rc {proc.returncode}) before {count} events {pattern}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(list(events.glob(pattern)))} of {count} events {pattern} in {timeout:.0f} s")
        time.sleep(0.2)


def test_optuna_sweep_restored_after_driver_kill_runs_exactly_num_samples(ray_session, sweep_overrides, tmp_path):
    """The driver runs in a process of its own (its own Ray), SIGKILLed; the resume runs in this process, on the
    session's Ray (what a restore does does not depend on which Ray runs it)."""
    events, folder = tmp_path / "events", tmp_path / "sweeps" / "loss-demo"
    overrides = sweep_overrides("ablation=loss", "search=optuna", "search.num_samples=3", "search.max_concurrent=2")
    # both trials of the first wave hold after their phase-2 epoch 1: the kill lands while two sampled trials
    # are mid-training and the third is not sampled yet, on any machine
    hold = [f"debug.event_dir={events}", "debug.hold_at_epoch=1", "debug.fail_stage=phase2"]
    kill_driver_when([*overrides, *hold], tmp_path / "driver.log",
                     lambda proc: _wait_for_events(events, "phase2.*.seed0.epoch1", 2, proc))
    held = sorted(p.name for p in events.glob("phase2.*.seed0.epoch1"))
    assert len(held) == 2 and not list(events.glob("phase2.*.seed0.epoch2"))
    assert json.loads((folder / "state.json").read_text())["status"] == "running"

    printed: list[str] = []
    assert run_sweep(compose_config([*overrides, "resume=true"]), log=printed.append) == 0  # debug.* dropped
    assert any(line.startswith("trials: restoring the Tune run") for line in printed), printed

    client, runs = mlflow_runs(tmp_path / "sweeps", "loss-demo")
    assert len(stage_runs(runs, "phase1")) == 1
    phase2 = stage_runs(runs, "phase2")
    sampled = [tuple(r.data.params[k] for k in SPACE) for r in phase2]
    assert len(phase2) == 3 and len(set(sampled)) == 3  # num_samples trials, none twice, none lost
    assert len({r.data.tags["lpt.stage_key"] for r in phase2}) == 3
    for run in phase2:
        assert run.info.status == "FINISHED"
        assert steps(client, run) == [0, 1, 2]  # the killed trials continued: no epoch logged twice
        assert steps(client, run, "loss") == [0, 1, 2]
    resumed_after = sorted((json.loads((tmp_path / "stages" / r.data.tags["lpt.stage_key"] / "result.json")
                                       .read_text())["extras"]["resumed_after_epoch"] for r in phase2), key=str)
    assert resumed_after == [1, 1, None]  # the two held trials resumed after epoch 1, the third ran fresh

    records = json.loads((folder / "trials.json").read_text())
    assert len(records) == 3
    assert sorted(tuple(str(r["config"][k]) for k in SPACE) for r in records) == sorted(sampled)
    assert sorted(r["run_id"] for r in records) == sorted(r.info.run_id for r in phase2)
    assert json.loads((folder / "state.json").read_text()) == {"status": "complete", "failed": [], "stopped": []}

    # the sweep's Optuna study, persisted in its folder, went on across the kill: the same 3 trials, numbered once,
    # none left running, their values and sampled params those of the finished trials
    study = optuna.load_study(study_name="loss-demo", storage=study_storage(folder))
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3 and not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert sorted(tuple(str(t.params[k]) for k in SPACE) for t in complete) == sorted(sampled)
    assert sorted(t.value for t in complete) == sorted(r["metrics"]["acc"] for r in records)
    assert "on the sweep's study (optuna.journal in its folder, 3 complete trials)" in \
        (folder / "report" / "report.md").read_text()
