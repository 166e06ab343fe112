"""MLflow as the comparison workbench: the sweep's parent run as its summary, and the view the printed link opens.

Every sweep of a dataset experiment (demo, places_lt, ...) is tracked in one MLflow experiment of one store (by
default SQLite in sweep.root, tracking.default_tracking_uri), so one `mlflow ui` compares them all. The link the
driver prints (`ui_link`) is MLflow 3.17's route to the runs table of that experiment, with two query parameters:

- `workflowType=machine_learning`: the "Model training" workflow of the side bar's toggle. MLflow 3.17 keeps that
  choice per browser, GenAI by default, and lets it (not the experiment's `mlflow.experimentKind` tag, which
  tracking.EXPERIMENT_TAGS sets for the clients that read it) decide what an experiment shows: a new browser
  opened on the bare experiment lands on GenAI's overview of traces.
- `viewStateShareKey=sweeps`: the view stored in the experiment tag `mlflow.sharedViewState.sweeps`, MLflow's
  "share view" mechanism and the only way to choose the table's columns from outside the browser (the UI keeps
  a user's own choices in the browser's local storage). The view groups the runs by sweep (tag lpt.sweep) and
  sorts them oldest first, so each group starts with the sweep's parent run, then its stage runs in the order
  they started. Columns: the stage runs' overall and few-shot accuracy under both split rules, then every
  sweep's per-row metric (the parent runs'); the run names column is wide enough for
  `phase1 (shared by m=5,10,20,40) seed=0`. The UI says the view is shared; "Exit shared view" returns to the
  user's own.
"""
from __future__ import annotations

import json

from orchestration.reporting.build import Report
from orchestration.reporting.statistics import MAX_OPTUNA_ROWS
from orchestration.tracking.run_names import metric_name, row_metrics
from orchestration.plan.record import PlanRecord
from orchestration.tracking.registry import TAG_SWEEP, RunRegistry

VIEW_KEY = "sweeps"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
RUN_NAME_COLUMN, RUN_NAME_WIDTH = "attributes.`Run Name`", 360
STAGE_COLUMNS = ("acc", "few", "few_std")  # lpt_core's keys of the stage runs' columns
TAG_COLUMNS = "lpt.columns"  # on a parent run: its per-row metrics, in the order of the rows
TAG_NOTE, NOTE_LIMIT = "mlflow.note.content", 8000  # the run's description (MLflow keeps 8000 characters)


def _description(markdown: str) -> str:
    if len(markdown) <= NOTE_LIMIT:
        return markdown
    tail = "\n\n(cut here: the whole report is the artifact report/report.md)"
    cut = markdown.rfind("\n", 0, NOTE_LIMIT - len(tail))  # after the last whole line that fits
    return markdown[:cut if cut > 0 else NOTE_LIMIT - len(tail)] + tail


def summarise_sweep(runs: RunRegistry, parent_id: str, plan: PlanRecord, report: Report) -> None:
    """The parent run as the sweep's summary (its params, PlanRecord.parent_params, are logged when it starts): one
    metric per report row with the ends of its 95 % interval (a search: its best trials, as report.md shows
    them), and report.md as its description; report.build_report logs the report's files, plots included, as its
    artifacts under report/."""
    searched = plan.search == "optuna"
    rows = report.rows[:MAX_OPTUNA_ROWS] if searched else report.rows  # a search's trials come best first
    metrics = row_metrics(plan.metric, None if searched else plan.axis, rows)
    runs.log_metrics(parent_id, metrics)
    points = [name for name in metrics if not name.endswith(("/lo", "/hi"))]
    runs.set_tags(parent_id, {TAG_NOTE: _description(report.markdown), TAG_COLUMNS: ";".join(points)})


def summarise_suite(runs: RunRegistry, parent_id: str, report: Report) -> None:
    """A suite's parent run: its report (tables and claims) as its description; each table's numbers are the metrics
    of the table's own run below it."""
    runs.set_tags(parent_id, {TAG_NOTE: _description(report.markdown)})


def view_state(columns: list[str]) -> dict:
    """The shared view (the keys of MLflow's experiment page state) showing these metric columns."""
    selected = [f"metrics.`{name}`" for name in columns]
    return {"selectedColumns": selected, "columnOrder": [RUN_NAME_COLUMN, *selected],
            "columnWidths": {RUN_NAME_COLUMN: RUN_NAME_WIDTH},
            "groupBy": {"aggregateFunction": "max", "groupByKeys": [{"mode": "tag", "groupByData": TAG_SWEEP}]},
            "orderByKey": "attributes.start_time", "orderByAsc": True}


def write_view(runs: RunRegistry) -> None:
    """Stores the view over every sweep of the experiment (rewritten when a sweep ends, so it has its columns)."""
    columns = [metric_name(key) for key in STAGE_COLUMNS]
    for parent in runs.sweep_parents():
        columns += [c for c in parent.data.tags.get(TAG_COLUMNS, "").split(";") if c and c not in columns]
    runs.set_experiment_tag(VIEW_TAG, json.dumps(view_state(columns)))


def ui_link(tracking_uri: str, experiment_id: str, port: int = 5000) -> tuple[str | None, str]:
    """(the command that serves the store, None for a tracking server; the link to the runs table)."""
    route = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    if tracking_uri.startswith(("http://", "https://")):
        return None, f"{tracking_uri.rstrip('/')}/{route}"
    return (f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port {port}",
            f"http://127.0.0.1:{port}/{route}")
