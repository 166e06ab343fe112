"""End-to-end sweeps on the tiny demo: real Ray Tune, real MLflow SQLite store, real files. (The Optuna search and
the joint stage are checked on test_all_ablations.py's sweeps of the loss and decoupled_vs_joint ablations; a trial
out of memory that fails alone while the sweep goes on, on test_failed_trials.py's sweep, which then resumes it.)"""
from __future__ import annotations

import csv
import json
import subprocess

import pytest

from experiments.compose import compose_config
from orchestration.execute.driver import run_sweep

from .conftest import ONE_SLOT, REPO, mlflow_runs, stage_runs, steps
from .report_checks import check_ablation_report

pytestmark = pytest.mark.slow


def test_group_size_trains_phase1_once_one_phase2_per_m_and_fused_rows_as_alone(ray_session, sweep_overrides,
                                                                                tmp_path, capsys):
    overrides = sweep_overrides("ablation=group_size")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert run_sweep(compose_config(overrides)) == 0

    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    phase1, phase2 = stage_runs(runs, "phase1"), stage_runs(runs, "phase2")
    assert len(phase1) == 1
    assert sorted(int(r.data.params["prompt.pool_size"]) for r in phase2) == [5, 10, 20, 40]
    assert sorted(r.info.run_name for r in phase2) == [f"phase2 m={m} seed=0" for m in (10, 20, 40, 5)]
    assert phase1[0].info.run_name == "phase1 (shared by m=5,10,20,40) seed=0"
    assert not [k for k in phase1[0].data.params if k.startswith(("prompt.pool_size", "phase2.", "joint."))]
    assert not [k for r in phase2 for k in r.data.params if k.startswith(("phase1.", "joint."))]
    params = phase1[0].data.params
    assert params["derived.lr"] == str(float(params["phase1.base_lr"]) * 8 / 256)  # x phase1.batch_size / 256
    assert int(phase1[0].data.params["derived.trainable_params"]) > 0
    assert steps(client, phase1[0]) == [0, 1]
    for run in phase2:
        assert steps(client, run) == [0, 1, 2]
        assert steps(client, run, "acc") == [0, 1, 2]
        assert run.data.tags["lpt.upstream_run_id"] == phase1[0].info.run_id
        assert run.data.tags["mlflow.parentRunId"] == phase1[0].data.tags["mlflow.parentRunId"]
        assert {"acc", "authors/few", "standard/few", "matching/consistency_frac", "query/knn_acc"} <= set(
            run.data.metrics)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"final", "per_class.parquet",
                                                                            "match.parquet"}
    parent = [r for r in runs if r.data.tags.get("lpt.role") == "sweep"]
    assert len(parent) == 1 and parent[0].data.tags["lpt.ablation"] == "group_size"
    assert parent[0].data.tags["mlflow.source.git.commit"] == commit
    assert parent[0].data.params == {"ablation": "group_size", "experiment": "demo", "axis": "m", "search": "grid",
                                     "seeds": "0", "metric": "acc", "rows": "5,10,20,40", "reference": "m=20"}

    folder = tmp_path / "sweeps" / "group_size-demo"
    records = json.loads((folder / "trials.json").read_text())
    assert sorted(r["row"] for r in records) == ["10", "20", "40", "5"]
    report = (folder / "report" / "report.md").read_text()
    assert parent[0].data.tags["mlflow.note.content"] == report.rstrip("\n")  # the report as its description
    with open(folder / "report" / "report.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["role"] != "upstream"]
    assert parent[0].data.metrics == {f"acc/m:{row['row']}{end}": float(row[f"acc{column}"])
                                      for row in rows for end, column in (("", ""), ("/lo", "_lo"), ("/hi", "_hi"))}
    assert report.count("| phase2 |") == 8  # 4 rows x 2 split rules
    assert (folder / "report" / "axis.png").stat().st_size > 0
    assert (folder / "report" / "matches.png").stat().st_size > 0
    assert json.loads((folder / "state.json").read_text())["status"] == "complete"
    check_ablation_report("group_size", folder)  # as test_all_ablations.py checks every other ablation's
    assert "  fused: m = 5, 10 (seed 0)" in capsys.readouterr().out  # four rows on two trial slots: two fused trials

    # a finished sweep run again trains nothing and prints its report
    stage_dirs = sorted(p.name for p in (tmp_path / "stages").glob("phase*"))
    done_times = {p: (tmp_path / "stages" / p / "DONE").stat().st_mtime_ns for p in stage_dirs}
    capsys.readouterr()
    assert run_sweep(compose_config(overrides)) == 0
    assert "nothing to train" in capsys.readouterr().out
    _, runs_again = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    assert len(runs_again) == len(runs)
    assert {p: (tmp_path / "stages" / p / "DONE").stat().st_mtime_ns for p in stage_dirs} == done_times

    # a second sweep of another ablation reuses the cached phase 1 instead of training it again
    assert run_sweep(compose_config(sweep_overrides("ablation=topk", "ablation.values=[1]"))) == 0
    _, topk_runs = mlflow_runs(tmp_path / "sweeps", "topk-demo")
    assert stage_runs(topk_runs, "phase1") == []
    assert len(stage_runs(topk_runs, "phase2")) == 1
    # one store for both sweeps: the topk report reads the reused phase 1's run from it too
    topk_report = (tmp_path / "sweeps" / "topk-demo" / "report" / "report.md").read_text()
    assert "| phase 1 (shared upstream) | phase1 |" in topk_report and "not in this tracking store" not in topk_report
    assert (tmp_path / "stages" / phase1[0].data.tags["lpt.stage_key"] / "DONE").stat().st_mtime_ns == \
        done_times[phase1[0].data.tags["lpt.stage_key"]]

    # Fusion is not part of what a sweep computes: m=10 and m=20, each fused with another row above, trained again in
    # a fresh folder with fuse=off (a trial per row, one after the other on one slot): the same stage keys, the same
    # metrics
    fused = {r["row"]: r for r in records}
    alone_root = tmp_path / "alone"
    capsys.readouterr()
    assert run_sweep(compose_config(sweep_overrides("ablation=group_size", "ablation.values=[10,20]", "fuse=off",
                                                    ONE_SLOT, root=alone_root))) == 0
    assert "fused:" not in capsys.readouterr().out
    alone = {r["row"]: r for r in json.loads((alone_root / "sweeps" / "group_size-demo" / "trials.json").read_text())}
    assert sorted(alone) == ["10", "20"]
    for row in ("10", "20"):
        assert alone[row]["stage_key"] == fused[row]["stage_key"]
        assert alone[row]["metrics"].keys() == fused[row]["metrics"].keys()
        for key, value in fused[row]["metrics"].items():
            assert value == pytest.approx(alone[row]["metrics"][key], abs=1e-6, nan_ok=True), (row, key)


def test_crashed_trial_is_retried_from_its_checkpoint_in_the_same_run(ray_session, sweep_overrides, tmp_path):
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[10]", "debug.fail_at_epoch=1",
                                "debug.fail_stage=phase2", "debug.fail_times=1")
    assert run_sweep(compose_config(overrides)) == 0
    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    (run,) = stage_runs(runs, "phase2")
    assert steps(client, run) == [0, 1, 2]
    assert steps(client, run, "loss") == [0, 1, 2]
    stage = tmp_path / "stages" / run.data.tags["lpt.stage_key"]
    assert (stage / "injected_failures").read_text() == "1"
    result = json.loads((stage / "result.json").read_text())
    assert result["extras"]["resumed_after_epoch"] == 1  # resumed after the crash, not restarted
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]


def test_diverging_trials_fail_with_their_reason_and_are_not_retried(ray_session, sweep_overrides, tmp_path):
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[5,10]", "phase2.base_lr=1e30", "fuse=off",
                                ONE_SLOT)  # a trial per row, one after the other in one trial process
    assert run_sweep(compose_config(overrides)) == 1
    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    phase2 = stage_runs(runs, "phase2")
    assert len(phase2) == 2  # the sweep went on to the second trial; neither was duplicated by a retry
    for run in phase2:
        assert run.info.status == "FAILED"
        assert "NonFiniteLossError" in run.data.tags["lpt.error"] and "phase2 epoch 0" in run.data.tags["lpt.error"]
    state = json.loads((tmp_path / "sweeps" / "group_size-demo" / "state.json").read_text())
    assert state["status"] == "incomplete" and sorted(state["failed"]) == ["10/seed=0", "5/seed=0"]


def test_more_gpus_than_the_cluster_has_is_refused(ray_session, sweep_overrides, tmp_path):
    from orchestration.cluster.ray_connection import ClusterError

    with pytest.raises(ClusterError, match="resources.gpu=2"):
        run_sweep(compose_config(sweep_overrides("ablation=group_size", "resources.gpu=2")))
    assert not (tmp_path / "sweeps" / "group_size-demo" / "plan.json").exists()

