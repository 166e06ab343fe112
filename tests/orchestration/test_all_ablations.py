"""Every registered ablation through `orchestration/sweep.py`'s driver on the tiny demo, all its rows (no
ablation.values), and its report checked (report_checks.py): the right rows in order, an interval on every
accuracy, the reference row marked and compared with, and every point estimate equal to what MLflow holds for the
row's runs. group_size's sweep is test_sweep.py's, which checks its report the same way.

One stage store for the module, so the default phase 1 is trained once and reused by every phase-2 ablation.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.ablations import ABLATIONS, get_ablation
from experiments.compose import compose_config
from orchestration.execute.driver import run_sweep
from orchestration.reporting.optuna_study import importances as importance_scores
from orchestration.tracking.study import load_sweep_study

from .conftest import ONE_SLOT, mlflow_runs, stage_runs, steps
from .report_checks import check_ablation_report, check_numbers_and_intervals, read_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("all_ablations")


def _joint_is_one_stage(root: Path) -> None:
    """decoupled_vs_joint: the joint row trains one stage of its own, beside the decoupled row's phase 2 (its phase 1
    is this module's shared one, trained by whichever sweep here ran first)."""
    client, runs = mlflow_runs(root / "sweeps", "decoupled_vs_joint-demo")
    assert [len(stage_runs(runs, s)) for s in ("phase2", "joint")] == [1, 1]
    (joint,) = stage_runs(runs, "joint")
    assert steps(client, joint) == [0, 1]
    report = (root / "sweeps" / "decoupled_vs_joint-demo" / "report" / "report.md").read_text()
    assert "| joint | joint |" in report and "| **decoupled** (reference) | phase2 |" in report


EXTRA_CHECKS = {"decoupled_vs_joint": _joint_is_one_stage}


@pytest.mark.parametrize("name", sorted(set(ABLATIONS) - {"group_size"}))
def test_ablation_end_to_end(name, ray_session, sweep_overrides, shared_root):
    assert len(ABLATIONS) == 12
    assert run_sweep(compose_config(sweep_overrides(f"ablation={name}", ONE_SLOT, root=shared_root))) == 0
    check_ablation_report(name, shared_root / "sweeps" / f"{name}-demo")
    if name in EXTRA_CHECKS:
        EXTRA_CHECKS[name](shared_root)


def test_loss_optuna_end_to_end(ray_session, sweep_overrides, shared_root):
    overrides = sweep_overrides("ablation=loss", "search=optuna", "search.num_samples=3", "search.max_concurrent=1",
                                "sweep.name=loss-optuna", root=shared_root)
    assert run_sweep(compose_config(overrides)) == 0
    folder = shared_root / "sweeps" / "loss-optuna"
    markdown, rows = read_report(folder)
    trials = [r for r in rows if r["role"] == "row"]
    assert len(trials) == 3 and [r["role"] for r in rows].count("upstream") == 1
    accs = [float(r["acc"]) for r in trials]
    assert accs == sorted(accs, reverse=True)  # best first
    check_numbers_and_intervals(folder, rows)
    importances = markdown.split("### parameter importances")[1]
    space = get_ablation("loss").space
    for key in space:
        assert f"| {key} |" in importances
    assert "Optuna trials have no reference row" in markdown
    assert (folder / "report" / "optuna.png").exists()
    # the importances are those of the sweep's own study, which optuna.load_study opens from the sweep folder
    study = load_sweep_study(folder, "loss-optuna")
    assert "on the sweep's study (optuna.journal in its folder, 3 complete trials)" in importances
    for key, value in importance_scores(study).items():
        assert f"| {key} | {value:.3f} |" in importances

    # each sampled trial is its own phase-2 run on the one phase 1, with distinct values inside the space
    _, runs = mlflow_runs(shared_root / "sweeps", "loss-optuna")
    phase2 = stage_runs(runs, "phase2")
    assert len(phase2) == 3
    sampled = {tuple(float(r.data.params[key]) for key in sorted(space)) for r in phase2}
    assert len(sampled) == 3
    for values in sampled:
        for key, value in zip(sorted(space), values):
            assert space[key].low <= value <= space[key].high, (key, value)
    records = json.loads((folder / "trials.json").read_text())
    assert len(records) == 3 and all(set(r["config"]) == set(space) for r in records)
