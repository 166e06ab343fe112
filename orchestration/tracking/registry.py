"""MLflow bookkeeping: one parent run per sweep, one child run per stage execution, idempotent per-epoch metrics.

`RunRegistry` holds the runs: they are found again by tag (lpt.sweep for the parent, lpt.sweep and lpt.stage_key
for a stage), so a retried or resumed trial continues its own run instead of starting a duplicate, and a stage
trained again for another sweep (its stage store cleaned, another stages.root) gets a run of its own, linked to
the first run of its key by the tag lpt.first_run_id. `MetricSpool` holds the
epoch metrics on their way: a step already logged is never logged twice (MLflow keeps every `log_metric` call),
and what a tracking outage keeps from the server waits on disk, in step order, until it can be sent. Everything
goes through MlflowClient with an explicit tracking URI: nothing depends on MLflow's process-global active run,
which Ray workers would not share.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import requests

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from lpt_core.files import atomic_write_bytes

T = TypeVar("T")
TAG_SWEEP, TAG_ROLE, TAG_STAGE_KEY, TAG_FIRST_RUN = "lpt.sweep", "lpt.role", "lpt.stage_key", "lpt.first_run_id"
TAG_ERROR, TAG_PREVIOUS_ERROR, TAG_STOPPED = "lpt.error", "lpt.previous_error", "lpt.stopped"
PARAM_VALUE_LIMIT = 6000
# what kind of experiment it is, for the MLflow clients that read it (the 3.17 UI follows the browser's workflow
# toggle instead, which the printed link sets: workbench.py)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
_SECRET = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<userinfo>[^/@\s]+)@")
_SECRET_QUERY = re.compile(r"(?i)((?:token|secret|password|key|signature)=)[^&\s]+")


def redact(value: str) -> str:
    """Drops credentials embedded in URIs (user:password@host, ?token=...) before they reach params or logs."""
    return _SECRET_QUERY.sub(r"\1***", _SECRET.sub(r"\g<scheme>***@", value))


def default_tracking_uri(sweep_root: str | Path) -> str:
    """One SQLite store for every sweep under sweep.root (beside their folders), so one `mlflow ui` shows them all."""
    return f"sqlite:///{(Path(sweep_root).resolve() / 'mlflow.db')}"


def artifact_root(store_uri: str, sweep_root: str | Path | None = None) -> Path | None:
    """The folder of a new experiment's artifacts. A database holds no files, and a client without a server would
    write them to ./mlruns wherever it runs: beside a SQLite store (its folder then holds everything), under
    sweep.root for a database server (postgresql://...); None for an `mlflow server`, which has its own store."""
    if store_uri.startswith(("http://", "https://", "databricks")):
        return None
    if store_uri.startswith("sqlite:///"):
        return Path(store_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
    return Path(sweep_root).resolve() / "mlartifacts" if sweep_root is not None else None


def artifact_location(root: Path | None, experiment: str) -> str | None:
    """The experiment's own folder under `root` (None: the server decides)."""
    return None if root is None else (root / re.sub(r"[^\w.-]", "_", experiment)).as_uri()


def is_outage(err: BaseException) -> bool:
    """The tracking server is down or unreachable (as opposed to a request it refused)."""
    if isinstance(err, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return isinstance(err, MlflowException) and any(
        marker in text for marker in ("API request to", "Max retries exceeded", "Connection refused", "timed out"))


def tracking_client(uri: str) -> MlflowClient:
    """A client that fails fast on an unreachable server: the spool, not MLflow's minutes of HTTP retries,
    bridges an outage. A server that is up but busy gets 30 s to answer: when 64 trials start logging together one
    answer can take 12 s, and a request given up on is sent again on top of the one the server still works on."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return MlflowClient(tracking_uri=uri)


def _retry(call: Callable[[], T], outage_wait_s: float, attempts: int = 5, delay_s: float = 0.5) -> T:
    """SQLite stores answer 'database is locked' under concurrent trials, and a server may be briefly down:
    retry with back-off (outages for up to outage_wait_s), then let the error through."""
    deadline, attempt = time.monotonic() + outage_wait_s, 0
    while True:
        try:
            return call()
        except Exception as err:
            delay = min(delay_s * 2 ** attempt, 10.0)
            locked = isinstance(err, MlflowException) and "locked" in str(err).lower() and attempt < attempts - 1
            if not locked and not (is_outage(err) and time.monotonic() + delay < deadline):
                raise
            time.sleep(delay)
            attempt += 1


class RunRegistry:
    """The sweep's runs in one MLflow experiment: found again by tag, created once (with their params), reopened
    by a retry or a resume, tagged, given their final statistics and artifacts, finished."""

    def __init__(self, uri: str, experiment: str, outage_wait_s: float = 120.0,
                 artifacts: Path | None = None) -> None:
        """artifacts: where a new experiment keeps its artifacts (`artifact_root`; default: beside a SQLite
        store, else the server's choice)."""
        self.uri, self.outage_wait_s = uri, outage_wait_s
        self.artifacts = artifacts if artifacts is not None else artifact_root(uri)
        self.client = tracking_client(uri)
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if missing (with its artifact location and kind). Sweeps started at once
        share the store: the one that finds the name taken between its look-up and its create reads it again."""
        found = self._call(lambda: self.client.get_experiment_by_name(name))
        if found is not None:
            return found.experiment_id
        try:
            return self._call(lambda: self.client.create_experiment(name, artifact_location(self.artifacts, name),
                                                                    EXPERIMENT_TAGS))
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._call(lambda: self.client.get_experiment_by_name(name)).experiment_id

    def _call(self, call: Callable[[], T]) -> T:
        return _retry(call, self.outage_wait_s)

    def _find(self, filter_string: str) -> str | None:
        runs = self._call(lambda: self.client.search_runs([self.experiment_id], filter_string, max_results=1,
                                                      order_by=["attributes.start_time ASC"]))
        return runs[0].info.run_id if runs else None

    def _create_run(self, filter_string: str, name: str, tags: dict[str, str]) -> str:
        """create_run at most once: when its answer is lost (an overloaded server's timeout) the run may exist all
        the same, so a retry looks for it first (a second run would split the stage's metrics between two)."""
        sent = []

        def create() -> str:
            if sent and (found := self._find(filter_string)) is not None:
                return found
            sent.append(name)
            return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

        return self._call(create)

    def parent_run(self, sweep: str, tags: dict[str, str]) -> str:
        found_by = f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_ROLE}` = 'sweep'"
        run_id = self._find(found_by)
        if run_id is None:
            run_id = self._create_run(found_by, sweep, {TAG_SWEEP: sweep, TAG_ROLE: "sweep", **tags})
        else:
            self._reopen(run_id)
        return run_id

    def stage_run(self, parent_id: str, sweep: str, key: str, name: str, params: dict[str, Any],
                  tags: dict[str, str]) -> str:
        """The stage's run in this sweep: found by sweep and key (a retry continues it, completing params a killed
        attempt did not log, never changing one it did) or created with its params, linked to the first run of the
        key where another sweep trained it before."""
        found_by = f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_STAGE_KEY}` = '{key}'"
        run_id = self._find(found_by)
        if run_id is not None:
            self._reopen(run_id)
            # a trial killed between create_run and log_params left the run without (some of) its params
            held = self._call(lambda: self.client.get_run(run_id)).data.params
            self.log_params(run_id, {k: v for k, v in params.items() if k not in held})
            return run_id
        first = self._find(f"tags.`{TAG_STAGE_KEY}` = '{key}'")
        all_tags = {TAG_SWEEP: sweep, TAG_ROLE: "stage", TAG_STAGE_KEY: key, MLFLOW_PARENT_RUN_ID: parent_id,
                    MLFLOW_RUN_NAME: name, **({TAG_FIRST_RUN: first} if first else {}), **tags}
        run_id = self._create_run(found_by, name, all_tags)
        self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params, credentials in URIs redacted; a key already logged must keep its value (MLflow's rule)."""
        items = [Param(k, redact(str(v))[:PARAM_VALUE_LIMIT]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            self._call(lambda: self.client.log_batch(run_id, params=items[start:start + 100]))

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """Values that describe the run as a whole (step 0), logged where the run does not hold them already:
        a sweep resumed with more trials finished updates its summary without repeating the unchanged values."""
        held = self._call(lambda: self.client.get_run(run_id)).data.metrics
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if held.get(k) != float(v)]
        if items:
            self._call(lambda: self.client.log_batch(run_id, metrics=items))

    def _reopen(self, run_id: str) -> None:
        """A run continued by a retry or a resume is RUNNING again; the error that ended its previous attempt
        moves from lpt.error to lpt.previous_error (lpt.error is what failed the run as it stands)."""
        error = self._call(lambda: self.client.get_run(run_id)).data.tags.get(TAG_ERROR)
        if error is not None:
            self.set_tags(run_id, {TAG_PREVIOUS_ERROR: error})
            self._call(lambda: self.client.delete_tag(run_id, TAG_ERROR))
        self._call(lambda: self.client.update_run(run_id, status="RUNNING"))

    def log_final(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        """End-of-stage statistics (K-NN, gamma, matching) that per-epoch logging does not carry."""
        logged = set(self._call(lambda: self.client.get_run(run_id)).data.metrics)
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if k not in logged and isinstance(v, (int, float)) and math.isfinite(float(v))]
        if items:
            self._call(lambda: self.client.log_batch(run_id, metrics=items))

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._call(lambda: self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_artifacts(self, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if path.is_dir():
                self._call(lambda: self.client.log_artifacts(run_id, str(path), artifact_path or path.name))
            elif path.is_file():
                self._call(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def finish(self, run_id: str, failed: str | None = None, stopped: str | None = None) -> None:
        """FINISHED; FAILED with the reason in lpt.error; or KILLED with the reason in lpt.stopped (a trial the
        scheduler stopped early)."""
        if failed is not None:
            self.set_tags(run_id, {TAG_ERROR: failed[:5000]})
        if stopped is not None:
            self.set_tags(run_id, {TAG_STOPPED: stopped})
        status = "FAILED" if failed else "KILLED" if stopped else "FINISHED"
        self._call(lambda: self.client.set_terminated(run_id, status))

    def sweep_parents(self) -> list:
        """The parent run of every sweep in the experiment, oldest first."""
        return self._call(lambda: self.client.search_runs([self.experiment_id], f"tags.`{TAG_ROLE}` = 'sweep'",
                                                      max_results=10000, order_by=["attributes.start_time ASC"]))

    def set_experiment_tag(self, key: str, value: str) -> None:
        self._call(lambda: self.client.set_experiment_tag(self.experiment_id, key, value))

    def runs_of_sweep(self, sweep: str) -> list:
        return self._call(lambda: self.client.search_runs([self.experiment_id], f"tags.`{TAG_SWEEP}` = '{sweep}'",
                                                      max_results=10000))


class MetricSpool:
    """Per-epoch metrics on their way to MLflow, sent in step order and never twice. While the server is
    unreachable they wait here and, with a folder, in <folder>/<run id>.jsonl, so that a later attempt of the run
    (`load`) or `lpt-replay-metrics` sends what the trial could not."""

    def __init__(self, client: MlflowClient, folder: str | Path | None = None) -> None:
        self.client = client
        self.folder = Path(folder) if folder is not None else None
        self._logged_steps: dict[str, set[int]] = {}
        self._pending: list[tuple[str, int, list[Metric]]] = []

    def _logged(self, run_id: str) -> set[int]:
        """The steps the run holds (asked once; an outage raises at once: the caller keeps the batch queued)."""
        if run_id not in self._logged_steps:
            history = _retry(lambda: self.client.get_metric_history(run_id, "epoch"), outage_wait_s=0)
            self._logged_steps[run_id] = {m.step for m in history}
        return self._logged_steps[run_id]

    def log_epoch(self, run_id: str, step: int, metrics: dict[str, float]) -> bool:
        """Logs one epoch's metrics in one batch, unless that step is already in the run. True if sent now;
        during a tracking outage the batch is spooled and sent by a later call (in step order, never twice)."""
        try:
            if step in self._logged(run_id):
                return False
        except Exception as err:  # unknown while the server is down: flush() checks again before sending
            if not is_outage(err):
                raise
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v)) and k != "epoch"]
        items.append(Metric("epoch", float(step), now, step))  # last: marks the step complete
        self._pending.append((run_id, step, items))
        self._write(run_id)
        return self.flush()

    def flush(self, timeout_s: float = 0.0) -> bool:
        """Sends the spooled batches; retries with back-off for up to timeout_s. True when nothing is left."""
        deadline, delay = time.monotonic() + timeout_s, 0.5
        while True:
            try:
                while self._pending:
                    run_id, step, items = self._pending[0]
                    if step not in self._logged(run_id):
                        _retry(lambda: self.client.log_batch(run_id, metrics=items), outage_wait_s=0)
                        self._logged_steps[run_id].add(step)
                    self._pending.pop(0)
                    self._write(run_id)
                return True
            except Exception as err:
                if not is_outage(err):
                    raise
                if time.monotonic() + delay > deadline:
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _write(self, run_id: str) -> None:
        if self.folder is None:
            return
        path = self.folder / f"{run_id}.jsonl"
        batches = [{"run_id": r, "step": step, "metrics": [[m.key, m.value, m.timestamp, m.step] for m in items]}
                   for r, step, items in self._pending if r == run_id]
        if not batches:
            path.unlink(missing_ok=True)
            return
        atomic_write_bytes(path, "".join(json.dumps(b) + "\n" for b in batches).encode())

    def load(self, run_id: str) -> None:
        """Batches an earlier attempt of this run could not send go first in the queue."""
        path = self.folder / f"{run_id}.jsonl" if self.folder is not None else None
        if path is None or not path.exists():
            return
        queued = {(r, step) for r, step, _ in self._pending}
        earlier = []
        for line in path.read_text().splitlines():
            batch = json.loads(line)
            if (batch["run_id"], batch["step"]) not in queued:
                earlier.append((batch["run_id"], batch["step"], [Metric(*m) for m in batch["metrics"]]))
        self._pending[:0] = earlier

    def unlogged(self) -> list[tuple[str, int]]:
        return [(run_id, step) for run_id, step, _ in self._pending]


def replay(folder: str | Path, uri: str) -> int:
    """Sends what a spool folder still holds (after an outage that outlived the trial). Returns batches left."""
    spool = MetricSpool(tracking_client(uri), folder)
    for path in sorted(Path(folder).glob("*.jsonl")):
        spool.load(path.stem)
    spool.flush(timeout_s=30)
    return len(spool.unlogged())


def replay_cli(argv: list[str] | None = None) -> int:
    """`lpt-replay-metrics SPOOL --uri URI`: what a trial printed when an outage outlived it."""
    parser = argparse.ArgumentParser(description=replay_cli.__doc__)
    parser.add_argument("spool")
    parser.add_argument("--uri", required=True)
    args = parser.parse_args(argv)
    left = replay(args.spool, args.uri)
    print(f"{left} batch(es) still unlogged" if left else "all spooled metrics logged")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(replay_cli())
