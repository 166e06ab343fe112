"""What a report is made of, and where each part is read from.

- Point estimates: the MLflow run of every trial (the store of record; its metric names read back as
  lpt_core's keys, run_names.lpt_metrics); trials.json's copy when the tracking store cannot be reached, and
  the report says so.
- Per-image predictions (for intervals): the stage store first (`<stage_root>/<key>/predictions.parquet`, on the
  same filesystem as the sweep), the run's MLflow artifact when the stage folder is gone or elsewhere.
- The phase 1 under a phase-2 trial: its key from the stage store's result.json (MLflow's `lpt.upstream_key` tag
  for stages written before the store recorded it), its numbers from its own MLflow run.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestration.tracking.run_names import lpt_metrics
from orchestration.tracking.registry import RunRegistry, redact

PREDICTIONS = "predictions.parquet"


@dataclass
class Run:
    """One finished stage run behind a table cell: a trial's final stage, or the phase 1 under it."""

    row: str
    seed: int
    stage: str
    stage_key: str
    run_id: str | None
    metrics: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)  # Optuna's sampled values
    upstream: str | None = None
    in_tracking: bool = False  # metrics read from this sweep's tracking store (not trials.json / result.json)


@dataclass
class Sources:
    """How the report reaches the stores; `client` is None when MLflow is not reachable (or not asked for)."""

    stage_root: Path
    client: Any = None
    note: str = "point estimates from trials.json (no tracking store given)"


def open_store(tracking_uri: str | None, experiment: str, outage_wait_s: float,
               store: str | None = None) -> tuple[Any, str]:
    """(MlflowClient or None, a sentence saying where the point estimates come from). store: what to call it
    there, when tracking_uri is only the way in (the sweep's own server, which stops with the sweep)."""
    if tracking_uri is None:
        return None, "point estimates from trials.json (no tracking store given)"
    try:
        return RunRegistry(tracking_uri, experiment, outage_wait_s=outage_wait_s).client, \
            f"point estimates from MLflow ({redact(store or tracking_uri)})"
    except Exception as err:  # an unreachable server must not lose the report: trials.json has the same numbers
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        return None, f"MLflow at {redact(tracking_uri)} unreachable ({reason}): point estimates from trials.json"


def _stage_result(stage_root: Path, key: str) -> dict[str, Any]:
    path = stage_root / key / "result.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _mlflow_run(client: Any, run_id: str | None) -> Any:
    if client is None or not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # a run missing from this store: the trials.json / stage-store numbers stand
        return None


def load_runs(folder: Path, sources: Sources) -> list[Run]:
    """One Run per finished trial (trials.json), metrics and upstream key completed from MLflow where reachable."""
    path = folder / "trials.json"
    records = json.loads(path.read_text()) if path.exists() else []
    runs = []
    for record in records:
        mlflow_run = _mlflow_run(sources.client, record.get("run_id"))
        metrics = dict(record["metrics"])
        upstream = _stage_result(sources.stage_root, record["stage_key"]).get("upstream")
        if mlflow_run is not None:
            metrics.update(lpt_metrics(mlflow_run.data.metrics))
            upstream = upstream or mlflow_run.data.tags.get("lpt.upstream_key")
        runs.append(Run(str(record["row"]), int(record["seed"]), record["stage"], record["stage_key"],
                        record.get("run_id"), metrics, dict(record.get("config") or {}), upstream,
                        mlflow_run is not None))
    return runs


def upstream_runs(runs: list[Run], sources: Sources) -> dict[str, Run]:
    """upstream key -> the phase-1 Run under the given phase-2 runs (metrics from its MLflow run, else result.json:
    a phase 1 reused from the stage store may have been trained, and tracked, by another sweep with its own
    store); keys whose stage folder and run are both gone are left out."""
    found = {}
    for run in runs:
        if run.upstream is None or run.upstream in found:
            continue
        result = _stage_result(sources.stage_root, run.upstream)
        run_id = result.get("run_id")
        mlflow_run = _mlflow_run(sources.client, run_id)
        if mlflow_run is None and not result:
            continue
        held = lpt_metrics(mlflow_run.data.metrics) if mlflow_run is not None else {}
        metrics = {**result.get("metrics", {}), **held}
        stage = result.get("stage", result.get("phase", "phase1"))  # "phase": result.json of earlier versions
        found[run.upstream] = Run("phase 1", run.seed, stage, run.upstream, run_id, metrics,
                                  in_tracking=mlflow_run is not None)
    return found


def load_predictions(run: Run, sources: Sources) -> pa.Table | None:
    """The run's per-image predictions: stage store, else its MLflow artifact, else None (no interval)."""
    local = sources.stage_root / run.stage_key / PREDICTIONS
    if local.exists():
        return pq.read_table(local)
    if sources.client is None or not run.run_id:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return pq.read_table(sources.client.download_artifacts(run.run_id, PREDICTIONS, tmp))
    except Exception:  # no such artifact (a stage from before predictions were stored) or the store went away
        return None
