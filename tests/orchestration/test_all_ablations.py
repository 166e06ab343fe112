"""Every registered ablation through `orchestration/sweep.py`'s driver on the tiny demo, all its rows (no
ablation.values), and its report checked (report_checks.py): the right rows in order, an interval on every
accuracy, the reference row marked and compared with, and every point estimate equal to what MLflow holds for the
row's runs. group_size's sweep is test_sweep.py's, which checks its report the same way; the loss ablation's Optuna
search (its report: best trials first, the study's importances) is test_load.py's hundred-trial sweep.

One stage store for the module, so the default phase 1 is trained once and reused by every phase-2 ablation.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments.ablations import ABLATIONS
from experiments.compose import compose_config
from orchestration.execute.driver import run_sweep

from .conftest import ONE_SLOT, mlflow_runs, stage_runs, steps
from .report_checks import check_ablation_report

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

