"""A trial that ended on purpose (out of memory, NaN loss) runs again on `resume=true`, alone, from its last
checkpoint and in its own MLflow run; a resume that would change the results is refused, naming the changed keys."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray.tune import ExperimentAnalysis

from experiments.compose import compose_config
from orchestration.execute.driver import SweepError, _check_existing, run_sweep
from orchestration.plan.sweep_plan import build_plan

from .conftest import ONE_SLOT, mlflow_runs, stage_runs, steps


def _started(sweep_overrides, *overrides: str) -> Path:
    """The sweep folder as a driver leaves it after a failure: plan.json as run_sweep writes it, state incomplete."""
    plan = build_plan(compose_config(sweep_overrides(*overrides)))
    folder = Path(plan.settings.sweep.root) / plan.name
    folder.mkdir(parents=True)
    plan.record().write(folder)
    (folder / "state.json").write_text(json.dumps({"status": "incomplete", "failed": ["5/seed=0"]}))
    return folder


def _resume(sweep_overrides, folder: Path, *overrides: str) -> str:
    plan = build_plan(compose_config(sweep_overrides(*overrides, "resume=true")))
    return _check_existing(plan, folder, plan.record())


def _refusal(sweep_overrides, folder: Path, *overrides: str) -> str:
    with pytest.raises(SweepError) as refused:
        _resume(sweep_overrides, folder, *overrides)
    return str(refused.value)


def test_resume_accepts_what_does_not_change_results(sweep_overrides):
    folder = _started(sweep_overrides, "ablation=group_size", "ablation.values=[5,10]", "debug.oom_at_epoch=1",
                      "debug.fail_row=5")
    assert _resume(sweep_overrides, folder, "ablation=group_size", "ablation.values=[5,10]", "resources.cpu=2",
                   "resources.gpu=0.5", "max_concurrent_trials=1", "max_failures=0") == "resume"


def test_a_changed_configuration_is_refused_naming_the_keys(sweep_overrides):
    folder = _started(sweep_overrides, "ablation=group_size", "ablation.values=[5,10]")
    message = _refusal(sweep_overrides, folder, "ablation=group_size", "ablation.values=[5,10]",
                       "phase2.batch_size=4")
    assert message == (
        f"sweep 'group_size-demo' in {folder} was started with a different configuration: "
        f"phase2.batch_size 8 -> 4; nothing was changed. To resume it, use its original values (resources.*, "
        f"max_concurrent_trials and debug.* may differ: they do not change results). To run the new configuration, "
        f"start it under a new name, e.g. sweep.name=group_size-demo-2: the phase1 stages this sweep finished are "
        f"taken from the stage cache, not trained again (the changed keys are not part of them)")

    (folder.parent / "group_size-demo-2").mkdir()  # the suggested name is one that is free
    message = _refusal(sweep_overrides, folder, "ablation=group_size", "ablation.values=[5]",
                       "data.eval_batch_size=32")
    assert 'configuration: ablation.values ["5", "10"] -> ["5"], data.eval_batch_size 64 -> 32; nothing' in message
    assert message.endswith("sweep.name=group_size-demo-3: every stage is trained again (each depends on a "
                            "changed key)")

    message = _refusal(sweep_overrides, folder, "ablation=group_size", "ablation.values=[5,10]", "threads=2")
    assert "configuration: threads 1 -> 2; nothing" in message
    assert message.endswith("every stage this sweep finished is taken from the stage cache, not trained again (no "
                            "key a stage depends on changed)")

    message = _refusal(sweep_overrides, folder, "ablation=group_size", "ablation.values=[5,10]", "stages.cache=false")
    assert "configuration: stages.cache true -> false; nothing" in message
    assert message.endswith("every stage is trained again (stages.cache=false keeps each sweep's stages to itself)")


def test_a_refusal_counts_a_stage_as_changed_with_the_stage_it_starts_from(sweep_overrides):
    """phase 2 starts from phase 1: a phase-1 key retrains both; a top-level field (precision) counts too."""
    folder = _started(sweep_overrides, "ablation=group_size", "ablation.values=[5,10]")
    message = _refusal(sweep_overrides, folder, "ablation=group_size", "ablation.values=[5,10]", "phase1.epochs=3")
    assert "configuration: phase1.epochs 2 -> 3; nothing" in message
    assert message.endswith("every stage is trained again (each depends on a changed key)")
    message = _refusal(sweep_overrides, folder, "ablation=group_size", "ablation.values=[5,10]", "precision=fp32")
    assert 'configuration: precision "auto" -> "fp32"; nothing' in message
    assert message.endswith("every stage is trained again (each depends on a changed key)")


def _by_row(runs, stage: str) -> dict:
    found = {}
    for run in stage_runs(runs, stage):
        assert run.data.tags["lpt.row"] not in found, "two MLflow runs for one row"
        found[run.data.tags["lpt.row"]] = run
    return found


def _rerun_trials(folder: Path, name: str) -> list[dict]:
    return [trial.config["trial"] for trial in ExperimentAnalysis(str(folder / "tune" / name)).trials]


@pytest.mark.slow
def test_out_of_memory_trial_runs_again_on_resume_and_only_it(ray_session, sweep_overrides, tmp_path, capsys):
    """Row 5 runs out of memory (a real allocator failure) in its phase-2 epoch 1: it fails alone with the reason,
    is not retried, and the sweep goes on with row 10; then resume=true runs that row again, and only it. A trial
    per row (fuse=off), one at a time on one slot: one trial process for both."""
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[5,10]", "fuse=off")
    assert run_sweep(compose_config([*overrides, ONE_SLOT, "debug.oom_at_epoch=1", "debug.fail_row=5"])) == 1
    assert "resume=true: the failed trials (and only they) run again" in capsys.readouterr().out
    folder, stages = tmp_path / "sweeps" / "group_size-demo", tmp_path / "stages"
    assert json.loads((folder / "state.json").read_text()) == {"status": "incomplete", "failed": ["5/seed=0"],
                                                                  "stopped": []}
    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    before = _by_row(runs, "phase2")  # one run each: the failed trial was not retried into a second run
    assert sorted(before) == ["10", "5"]
    assert before["5"].info.status == "FAILED" and steps(client, before["5"]) == [0, 1]
    assert before["10"].info.status == "FINISHED" and steps(client, before["10"]) == [0, 1, 2]  # the sweep went on
    reason = before["5"].data.tags["lpt.error"]
    assert reason.startswith("StageOutOfMemoryError: phase2 epoch 1: out of memory on cpu")
    assert "can't allocate memory" in reason and "phase2.batch_size (now 8 per branch" in reason
    finished_key = before["10"].data.tags["lpt.stage_key"]
    finished_done = (stages / finished_key / "DONE").stat().st_mtime_ns

    # the fault removed (debug.*), and what only places or paces the work changed: accepted, not refused
    resumed = [*overrides, "resume=true", "resources.cpu=1", "max_concurrent_trials=1"]
    assert run_sweep(compose_config(resumed)) == 0

    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    after = _by_row(runs, "phase2")
    assert {row: run.info.run_id for row, run in after.items()} == {row: r.info.run_id for row, r in before.items()}
    assert len(stage_runs(runs, "phase1")) == 1
    assert len([r for r in runs if r.data.tags.get("lpt.role") == "sweep"]) == 1
    rerun = after["5"]
    assert rerun.info.status == "FINISHED" and "lpt.error" not in rerun.data.tags
    assert rerun.data.tags["lpt.previous_error"].startswith("StageOutOfMemoryError: phase2 epoch 1")
    for run in after.values():
        assert steps(client, run) == [0, 1, 2]
        assert steps(client, run, "loss") == [0, 1, 2]
    result = json.loads((stages / rerun.data.tags["lpt.stage_key"] / "result.json").read_text())
    assert result["extras"]["resumed_after_epoch"] == 1  # continued after its last checkpoint, not restarted
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]

    # the finished row was not trained again: its stage and its MLflow run are untouched
    assert (stages / finished_key / "DONE").stat().st_mtime_ns == finished_done
    assert after["10"].info.end_time == before["10"].info.end_time
    assert _rerun_trials(folder, "trials-rerun1") == [{"row": "5", "seed": 0}]

    assert json.loads((folder / "state.json").read_text()) == {"status": "complete", "failed": [], "stopped": []}
    records = json.loads((folder / "trials.json").read_text())
    assert sorted((r["row"], r["run_id"]) for r in records) == sorted((row, r.info.run_id) for row, r in after.items())
    parent = [r for r in runs if r.data.tags.get("lpt.role") == "sweep"][0]
    assert parent.info.status == "FINISHED" and "lpt.error" not in parent.data.tags


@pytest.mark.slow
def test_failed_phase1_runs_again_on_resume(ray_session, sweep_overrides, tmp_path):
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[5,10]", "fuse=off", ONE_SLOT)
    assert run_sweep(compose_config([*overrides, "debug.oom_at_epoch=0", "debug.fail_stage=phase1"])) == 1
    folder = tmp_path / "sweeps" / "group_size-demo"
    assert json.loads((folder / "state.json").read_text()) == {"status": "incomplete", "failed": ["5/seed=0"]}
    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    (phase1,) = stage_runs(runs, "phase1")
    assert phase1.info.status == "FAILED" and steps(client, phase1) == [0]
    assert stage_runs(runs, "phase2") == []  # the trials on top of it were not started

    assert run_sweep(compose_config([*overrides, "resume=true"])) == 0
    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    (again,) = stage_runs(runs, "phase1")
    assert again.info.run_id == phase1.info.run_id and again.info.status == "FINISHED"
    assert steps(client, again) == [0, 1]
    result = json.loads((tmp_path / "stages" / again.data.tags["lpt.stage_key"] / "result.json").read_text())
    assert result["extras"]["resumed_after_epoch"] == 0
    phase2 = _by_row(runs, "phase2")
    assert sorted(phase2) == ["10", "5"] and all(steps(client, r) == [0, 1, 2] for r in phase2.values())
    assert _rerun_trials(folder, "upstream-rerun1") == [{"row": "5", "seed": 0}]
    assert json.loads((folder / "state.json").read_text()) == {"status": "complete", "failed": [], "stopped": []}
    assert sorted(r["row"] for r in json.loads((folder / "trials.json").read_text())) == ["10", "5"]
