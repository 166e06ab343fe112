"""What every ablation's report must hold (tests/orchestration/test_all_ablations.py runs them all; test_sweep.py's
group-size sweep is that ablation's run): the rows in order, an interval on every accuracy, the reference row,
paired differences with Holm's correction, numbers equal to MLflow's, the plots."""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from experiments.ablations import get_ablation
from orchestration.reporting.statistics import POINT_KEYS, RULE_KEYS
from orchestration.tracking.run_names import lpt_metrics

PER_ROW_PHASE1 = {"prompt_length", "sampling", "model_size", "per_phase", "vpt_sampling"}  # no phase 1 shared by all rows


def read_report(folder: Path) -> tuple[str, list[dict]]:
    with open(folder / "report" / "report.csv") as handle:
        return (folder / "report" / "report.md").read_text(), list(csv.DictReader(handle))


def _held(folder: Path, run_id: str) -> dict[str, float]:
    """What MLflow holds for a run, by lpt_core's keys: every sweep here, and so the phase 1 a sweep reused from
    the stage store, is tracked in the one default store beside the sweep folders (a suite's table folders sit one
    level further down)."""
    from mlflow.tracking import MlflowClient

    store = next(parent / "mlflow.db" for parent in folder.parents if (parent / "mlflow.db").exists())
    return lpt_metrics(MlflowClient(f"sqlite:///{store}").get_run(run_id).data.metrics)


def _mlflow_means(folder: Path, row: dict) -> dict[str, float]:
    """Per key, the mean over the row's runs of the value MLflow holds (nan where no run has it)."""
    held = [_held(folder, run_id) for run_id in row["run_ids"].split(";")]
    means = {}
    for key in POINT_KEYS:
        values = [m[key] for m in held if key in m]
        means[key] = statistics.fmean(values) if values else math.nan
    return means


def check_numbers_and_intervals(folder: Path, rows: list[dict]) -> None:
    for row in rows:
        for key, expected in _mlflow_means(folder, row).items():
            value = float(row[key])
            assert value == expected or (math.isnan(value) and math.isnan(expected)), (row["row"], key)
        for key in RULE_KEYS:
            if not math.isnan(float(row[key])):  # an empty shot group (many, on the tiny demo) has no interval
                low, high = float(row[f"{key}_lo"]), float(row[f"{key}_hi"])
                assert 0.0 <= low <= high <= 100.0, (row["row"], key, low, high)


def check_ablation_report(name: str, folder: Path) -> None:
    """The report of the finished demo sweep of ablation `name` in `folder`."""
    ablation = get_ablation(name)
    markdown, all_rows = read_report(folder)
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
    check_numbers_and_intervals(folder, rows)
    authors = markdown.split("### authors")[1].split("###")[0]
    cells = [c.strip() for line in authors.splitlines()[3:] if line.startswith("| ") for c in line.split("|")[3:-1]]
    assert cells and all("±" in c for c in cells if c != "-"), cells
    assert "± = half-width of the 95 % percentile interval" in markdown and "paper, Places-LT" not in markdown
    for row in rows:  # every other line is compared with the reference, paired, on overall and few
        if row["role"] != "reference":
            assert row["d_acc_lo"] and row["d_few_lo"], row["row"]
            assert float(row["d_acc"]) == pytest.approx(float(row["acc"]) - float(
                next(r for r in rows if r["role"] == "reference")["acc"]))
    assert "Holm's correction" in markdown
    assert {"axis.png", "compare.png"} <= {p.name for p in (folder / "report").iterdir()}
    assert json.loads((folder / "state.json").read_text())["status"] == "complete"
