"""Every registered ablation through `orchestration/sweep.py`'s driver on the tiny demo, all its rows (no
ablation.values), and its report checked: the right rows in order, an interval on every accuracy, the reference
row marked and compared with, and every point estimate equal to what MLflow holds for the row's runs.

One stage store for the module, so the default phase 1 is trained once and reused by every phase-2 ablation.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from experiments.ablations import ABLATIONS, get_ablation
from experiments.compose import compose_config
from orchestration.execute.driver import run_sweep
from orchestration.reporting.statistics import POINT_KEYS, RULE_KEYS
from orchestration.tracking.run_names import lpt_metrics

pytestmark = pytest.mark.slow

PER_ROW_PHASE1 = {"prompt_length", "sampling", "model_size", "per_phase"}  # no phase 1 shared by all rows


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("all_ablations")


def _report(folder: Path) -> tuple[str, list[dict]]:
    with open(folder / "report" / "report.csv") as handle:
        return (folder / "report" / "report.md").read_text(), list(csv.DictReader(handle))


def _held(folder: Path, run_id: str) -> dict[str, float]:
    """What MLflow holds for a run, by lpt_core's keys: every sweep here, and so the phase 1 a sweep reused from
    the stage store, is tracked in the one default store beside the sweep folders."""
    from mlflow.tracking import MlflowClient

    return lpt_metrics(MlflowClient(f"sqlite:///{folder.parent / 'mlflow.db'}").get_run(run_id).data.metrics)


def _mlflow_means(folder: Path, row: dict) -> dict[str, float]:
    """Per key, the mean over the row's runs of the value MLflow holds (nan where no run has it)."""
    held = [_held(folder, run_id) for run_id in row["run_ids"].split(";")]
    means = {}
    for key in POINT_KEYS:
        values = [m[key] for m in held if key in m]
        means[key] = statistics.fmean(values) if values else math.nan
    return means


def _check_numbers_and_intervals(folder: Path, rows: list[dict]) -> None:
    for row in rows:
        for key, expected in _mlflow_means(folder, row).items():
            value = float(row[key])
            assert value == expected or (math.isnan(value) and math.isnan(expected)), (row["row"], key)
        for key in RULE_KEYS:
            if not math.isnan(float(row[key])):  # an empty shot group (many, on the tiny demo) has no interval
                low, high = float(row[f"{key}_lo"]), float(row[f"{key}_hi"])
                assert 0.0 <= low <= high <= 100.0, (row["row"], key, low, high)


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_end_to_end(name, ray_session, sweep_overrides, shared_root):
    assert len(ABLATIONS) == 11
    ablation = get_ablation(name)
    assert run_sweep(compose_config(sweep_overrides(f"ablation={name}", root=shared_root))) == 0
    folder = shared_root / "sweeps" / f"{name}-demo"
    markdown, all_rows = _report(folder)
    rows = [r for r in all_rows if r["role"] != "step"]
    labels = [p.label for p in ablation.points_for("demo")]
    reference = ablation.reference_for("demo")
    assert [r["row"] for r in rows if r["role"] != "upstream"] == labels
    steps = [r for r in all_rows if r["role"] == "step"]  # per_phase: Tab. 8's steps, paired like the rows
    assert [r["row"] for r in steps] == [f"{a} - {b}" for a, b in ablation.steps]
    for step in steps:
        a, b = (next(r for r in rows if r["row"] == label) for label in step["row"].split(" - "))
        assert float(step["d_acc"]) == pytest.approx(float(a["acc"]) - float(b["acc"]))
        assert float(step["d_acc_lo"]) <= float(step["d_acc"]) <= float(step["d_acc_hi"])
    assert [r["row"] for r in rows if r["role"] == "reference"] == [reference]
    assert f"| **{reference}** (reference) |" in markdown
    upstream = [r["row"] for r in rows if r["role"] == "upstream"]
    assert upstream == ([] if name in PER_ROW_PHASE1 else ["phase 1 (shared upstream)"])
    _check_numbers_and_intervals(folder, rows)
    authors = markdown.split("### authors")[1].split("###")[0]
    cells = [c.strip() for line in authors.splitlines()[3:] if line.startswith("| ") for c in line.split("|")[3:-1]]
    assert cells and all("±" in c for c in cells if c != "-"), cells
    assert "± = half-width of the 95 % percentile interval" in markdown and "paper" not in markdown
    for row in rows:  # every other line is compared with the reference, paired, on overall and few
        if row["role"] != "reference":
            assert row["d_acc_lo"] and row["d_few_lo"], row["row"]
            assert float(row["d_acc"]) == pytest.approx(float(row["acc"]) - float(
                next(r for r in rows if r["role"] == "reference")["acc"]))
    assert "Holm's correction" in markdown
    assert {"axis.png", "compare.png"} <= {p.name for p in (folder / "report").iterdir()}
    assert json.loads((folder / "state.json").read_text())["status"] == "complete"


def test_loss_optuna_end_to_end(ray_session, sweep_overrides, shared_root):
    overrides = sweep_overrides("ablation=loss", "search=optuna", "search.num_samples=3", "search.max_concurrent=1",
                                "sweep.name=loss-optuna", root=shared_root)
    assert run_sweep(compose_config(overrides)) == 0
    folder = shared_root / "sweeps" / "loss-optuna"
    markdown, rows = _report(folder)
    trials = [r for r in rows if r["role"] == "row"]
    assert len(trials) == 3 and [r["role"] for r in rows].count("upstream") == 1
    accs = [float(r["acc"]) for r in trials]
    assert accs == sorted(accs, reverse=True)  # best first
    _check_numbers_and_intervals(folder, rows)
    importances = markdown.split("### parameter importances")[1]
    for key in get_ablation("loss").space:
        assert f"| {key} |" in importances
    assert "Optuna trials have no reference row" in markdown
    assert (folder / "report" / "optuna.png").exists()
