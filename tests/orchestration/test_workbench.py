"""The parent run's summary, the shared view of the runs table and the printed link, against a real SQLite store
(the browser's side: test_mlflow_ui.py)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from orchestration.reporting.build import Report
from orchestration.plan.record import PlanRecord
from orchestration.tracking.registry import RunRegistry
from orchestration.reporting.workbench import NOTE_LIMIT, VIEW_TAG, summarise_sweep, ui_link, write_view

PLAN = PlanRecord("f", "gs", "group_size", "demo", "m", ["5", "20"], [0], "grid", "acc", "/stages")
ROWS = [{"row": "5", "role": "row", "acc": 50.0, "acc_lo": 40.0, "acc_hi": 60.0},
        {"row": "20", "role": "reference", "acc": 55.0, "acc_lo": 45.0, "acc_hi": 65.0},
        {"row": "phase 1 (shared upstream)", "role": "upstream", "acc": 30.0, "acc_lo": 20.0, "acc_hi": 40.0}]


def test_the_parent_run_summarises_the_sweep(tmp_path: Path) -> None:
    runs = RunRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", "demo")
    parent = runs.parent_run("gs", {})
    summarise_sweep(runs, parent, PLAN, Report("## gs: ablation `group_size`\n\n| m | acc |", ROWS))
    run = runs.client.get_run(parent)
    assert run.data.metrics == {"acc/m:5": 50.0, "acc/m:5/lo": 40.0, "acc/m:5/hi": 60.0,
                                "acc/m:20": 55.0, "acc/m:20/lo": 45.0, "acc/m:20/hi": 65.0}
    assert run.data.tags["mlflow.note.content"] == "## gs: ablation `group_size`\n\n| m | acc |"
    assert run.data.tags["lpt.columns"] == "acc/m:5;acc/m:20"

    long_report = "\n".join(f"| {i} | {'x' * 90} |" for i in range(200))
    summarise_sweep(runs, parent, PLAN, Report(long_report, ROWS))
    note = runs.client.get_run(parent).data.tags["mlflow.note.content"]
    assert len(note) <= NOTE_LIMIT and note.endswith("(cut here: the whole report is the artifact report/report.md)")
    assert long_report.startswith(note.split("\n\n(cut here")[0] + "\n")  # cut after a whole line


def test_a_search_is_summarised_by_its_best_trials(tmp_path: Path) -> None:
    runs = RunRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", "demo")
    parent = runs.parent_run("loss", {})
    plan = dataclasses.replace(PLAN, ablation="loss", axis="lambda+/lambda-/eta", rows=[], search="optuna")
    trials = [{"row": f"eta={0.1 * i:.1f}", "role": "row", "acc": 60.0 - i} for i in range(12)]  # best first
    summarise_sweep(runs, parent, plan, Report("loss", trials))
    assert runs.client.get_run(parent).data.metrics == {f"acc/eta:{0.1 * i:.1f}": 60.0 - i for i in range(10)}


def test_the_view_groups_every_sweep_and_shows_their_key_metrics(tmp_path: Path) -> None:
    runs = RunRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", "demo")
    summarise_sweep(runs, runs.parent_run("gs", {}), PLAN, Report("gs", ROWS))
    topk = dataclasses.replace(PLAN, name="tk", ablation="topk", axis="k", rows=["1"])
    summarise_sweep(runs, runs.parent_run("tk", {}), topk, Report("tk", [{"row": "1", "role": "row", "acc": 1.0}]))
    write_view(runs)
    view = json.loads(runs.client.get_experiment(runs.experiment_id).tags[VIEW_TAG])
    columns = ["metrics.`acc`", "metrics.`authors/few`", "metrics.`standard/few`", "metrics.`acc/m:5`",
               "metrics.`acc/m:20`", "metrics.`acc/k:1`"]
    by_sweep = {"aggregateFunction": "max", "groupByKeys": [{"mode": "tag", "groupByData": "lpt.sweep"}]}
    assert view == {"selectedColumns": columns, "columnOrder": ["attributes.`Run Name`", *columns],
                    "columnWidths": {"attributes.`Run Name`": 360}, "groupBy": by_sweep,
                    "orderByKey": "attributes.start_time", "orderByAsc": True}


def test_ui_link() -> None:
    assert ui_link("sqlite:////data/sweeps/mlflow.db", "3") == (
        "mlflow ui --backend-store-uri sqlite:////data/sweeps/mlflow.db --host 127.0.0.1 --port 5000",
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=sweeps")
    assert ui_link("http://10.0.0.5:5000/", "7") == (
        None, "http://10.0.0.5:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=sweeps")
