"""MLflow bookkeeping against a real SQLite tracking store: get-or-create runs, idempotent metrics, redaction."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from orchestration.tracking.registry import (MetricSpool, RunRegistry, artifact_location, artifact_root,
                                             default_tracking_uri, redact)

_names = itertools.count()


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds); tests use their own names."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def runs(uri: str) -> RunRegistry:
    return RunRegistry(uri, "lpt-test")


@pytest.fixture
def sweep() -> str:
    return f"sweep-{next(_names)}"


def stage(runs: RunRegistry, sweep: str, params: dict | None = None) -> tuple[str, str]:
    parent = runs.parent_run(sweep, {"lpt.ablation": "group_size"})
    key = f"phase1-{sweep}"
    return parent, runs.stage_run(parent, sweep, key, "phase1", params or {"prompt.length": 4}, {"lpt.row": "5"})


def test_default_tracking_uri_is_one_sqlite_store_under_sweep_root(tmp_path: Path) -> None:
    assert default_tracking_uri(tmp_path / "sweeps") == f"sqlite:///{tmp_path.resolve()}/sweeps/mlflow.db"


def test_same_experiment_is_reused(uri: str, runs: RunRegistry) -> None:
    assert RunRegistry(uri, "lpt-test").experiment_id == runs.experiment_id


def test_an_experiment_created_by_another_sweep_meanwhile_is_used(tmp_path: Path, monkeypatch) -> None:
    """Two sweeps start at once on a fresh store: both look the experiment up before either creates it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = RunRegistry(uri, "demo")
    lookup, calls = MlflowClient.get_experiment_by_name, []

    def raced(self, name):  # the second sweep's first look-up ran before the first sweep's create
        calls.append(name)
        return None if len(calls) == 1 else lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", raced)
    assert RunRegistry(uri, "demo").experiment_id == first.experiment_id
    assert calls == ["demo", "demo"]


def test_an_experiment_trains_models_and_keeps_its_artifacts_beside_the_store(tmp_path: Path) -> None:
    runs = RunRegistry(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "places_lt")
    experiment = runs.client.get_experiment(runs.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    folder = tmp_path / "store" / "mlartifacts" / "places_lt"
    assert experiment.artifact_location == folder.as_uri()
    parent = runs.parent_run("s", {})
    (tmp_path / "report.md").write_text("table")
    runs.log_artifacts(parent, [tmp_path / "report.md"], "report")
    assert (folder / parent / "artifacts" / "report" / "report.md").read_text() == "table"


def test_artifacts_of_each_kind_of_store_go_where_every_node_and_the_ui_find_them(tmp_path: Path) -> None:
    assert artifact_root("http://127.0.0.1:5000", tmp_path) is None  # a server's own artifact store
    assert artifact_root("sqlite:///team.db", tmp_path) == Path("mlartifacts").resolve()  # beside the file
    assert artifact_root("postgresql://lpt@db:5432/lpt", tmp_path / "sweeps") == tmp_path / "sweeps" / "mlartifacts"
    assert artifact_root("postgresql://lpt@db:5432/lpt") is None
    assert artifact_location(tmp_path, "a/b") == (tmp_path / "a_b").as_uri()
    assert artifact_location(None, "demo") is None


def test_log_metrics_logs_only_what_changed(runs: RunRegistry, sweep: str) -> None:
    parent = runs.parent_run(sweep, {})
    runs.log_metrics(parent, {"acc/m:5": 50.0, "acc/m:20": 40.0})
    runs.log_metrics(parent, {"acc/m:5": 50.0, "acc/m:20": 45.0, "acc/m:40": 30.0})  # a resume finished more
    assert runs.client.get_run(parent).data.metrics == {"acc/m:5": 50.0, "acc/m:20": 45.0, "acc/m:40": 30.0}
    assert [m.value for m in runs.client.get_metric_history(parent, "acc/m:5")] == [50.0]
    assert [m.value for m in runs.client.get_metric_history(parent, "acc/m:20")] == [40.0, 45.0]


def test_sweep_parents_oldest_first(tmp_path: Path) -> None:
    runs = RunRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", "demo")
    first = runs.parent_run("b-first", {})
    while int(time.time() * 1000) <= runs.client.get_run(first).info.start_time:  # start times are in ms
        time.sleep(0.001)
    second = runs.parent_run("a-second", {})
    stage(runs, "b-first")
    assert [r.info.run_id for r in runs.sweep_parents()] == [first, second]


def test_parent_run_is_get_or_create(runs: RunRegistry, sweep: str) -> None:
    first = runs.parent_run(sweep, {"lpt.ablation": "group_size"})
    assert runs.parent_run(sweep, {"lpt.ablation": "group_size"}) == first
    assert runs.parent_run(f"{sweep}-other", {}) != first
    run = runs.client.get_run(first)
    assert run.data.tags["lpt.sweep"] == sweep and run.data.tags["lpt.ablation"] == "group_size"


def test_stage_run_is_get_or_create_by_key(runs: RunRegistry, sweep: str) -> None:
    parent, run_id = stage(runs, sweep, {"prompt.length": 4, "seed": 0})
    again = runs.stage_run(parent, sweep, f"phase1-{sweep}", "phase1", {"prompt.length": 99, "extra": 1}, {})
    assert again == run_id
    run = runs.client.get_run(run_id)
    # a held value is never changed; a param the first attempt did not log (killed between create_run and
    # log_params) is completed by the reopening call
    assert run.data.params == {"prompt.length": "4", "seed": "0", "extra": "1"}
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert run.data.tags["lpt.stage_key"] == f"phase1-{sweep}" and run.data.tags["lpt.row"] == "5"
    assert {r.info.run_id for r in runs.runs_of_sweep(sweep)} == {parent, run_id}


def test_log_epoch_is_idempotent_across_tracker_instances(uri: str, runs: RunRegistry, sweep: str) -> None:
    _, run_id = stage(runs, sweep)
    spool = MetricSpool(runs.client)
    assert spool.log_epoch(run_id, 0, {"loss": 2.0, "acc": 10.0})
    assert spool.log_epoch(run_id, 1, {"loss": 1.5, "acc": 20.0})
    assert not spool.log_epoch(run_id, 1, {"loss": 9.0})
    resumed = MetricSpool(RunRegistry(uri, "lpt-test").client)  # a retried trial: a fresh process, same run
    logged = [resumed.log_epoch(run_id, step, {"loss": 1.0, "acc": 30.0 + step, "lr": float("nan")})
              for step in (0, 1, 2)]
    assert logged == [False, False, True]
    for name in ("epoch", "loss", "acc"):
        history = runs.client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == [0, 1, 2], name
    acc = {m.step: m.value for m in runs.client.get_metric_history(run_id, "acc")}
    assert acc == {0: 10.0, 1: 20.0, 2: 32.0}  # the first values of steps 0, 1 are kept
    assert runs.client.get_metric_history(run_id, "lr") == []  # non-finite values are not logged


def test_log_final_only_adds_new_keys(runs: RunRegistry, sweep: str) -> None:
    _, run_id = stage(runs, sweep)
    MetricSpool(runs.client).log_epoch(run_id, 0, {"acc": 40.0})
    runs.log_final(run_id, 0, {"acc": 99.0, "query_knn_acc": 55.0, "gamma": 0.3})
    runs.log_final(run_id, 0, {"query_knn_acc": 77.0})
    metrics = runs.client.get_run(run_id).data.metrics
    assert metrics["acc"] == 40.0 and metrics["query_knn_acc"] == 55.0 and metrics["gamma"] == 0.3
    assert len(runs.client.get_metric_history(run_id, "acc")) == 1
    assert len(runs.client.get_metric_history(run_id, "query_knn_acc")) == 1


def test_finish_marks_failed_with_the_error(runs: RunRegistry, sweep: str) -> None:
    parent, run_id = stage(runs, sweep)
    runs.finish(run_id, failed="RuntimeError: boom")
    run = runs.client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["lpt.error"] == "RuntimeError: boom"
    runs.finish(parent)
    assert runs.client.get_run(parent).info.status == "FINISHED"
    assert runs.stage_run(parent, sweep, f"phase1-{sweep}", "phase1", {}, {}) == run_id  # a retry continues it
    assert runs.client.get_run(run_id).info.status == "RUNNING"


@pytest.mark.parametrize("raw, clean", [
    ("postgresql://alice:s3cret@db.example:5432/mlflow", "postgresql://***@db.example:5432/mlflow"),
    ("https://token@github.com/org/repo", "https://***@github.com/org/repo"),
    ("s3://bucket/path?token=abc123&region=x", "s3://bucket/path?token=***&region=x"),
    ("https://host/x?Signature=zz&password=pw", "https://host/x?Signature=***&password=***"),
    ("sqlite:////tmp/sweeps/mlflow.db", "sqlite:////tmp/sweeps/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redact(raw: str, clean: str) -> None:
    assert redact(raw) == clean


def test_stage_run_params_are_redacted(runs: RunRegistry, sweep: str) -> None:
    params = {"sweep.storage": "s3://u:pw@bucket/x?token=t0k", "data.root": "/data/places"}
    _, run_id = stage(runs, sweep, params)
    logged = runs.client.get_run(run_id).data.params
    assert logged == {"sweep.storage": "s3://***@bucket/x?token=***", "data.root": "/data/places"}
    assert "pw" not in str(logged) and "t0k" not in str(logged)


def test_a_stage_trained_again_for_another_sweep_gets_its_own_run(runs: RunRegistry, sweep: str) -> None:
    """The stage store was cleaned (or another stages.root used): sweep B trains stage K again, which sweep A
    trained and tracked. B's run is its own, linked to A's; A's keeps its steps; B's epochs are all logged."""
    parent_a, run_a = stage(runs, sweep)
    spool = MetricSpool(runs.client)
    for step in (0, 1):
        spool.log_epoch(run_a, step, {"loss": 2.0 - step})
    runs.finish(run_a)
    parent_b = runs.parent_run(f"{sweep}-b", {})
    run_b = runs.stage_run(parent_b, f"{sweep}-b", f"phase1-{sweep}", "phase1", {"prompt.length": 4}, {})
    assert run_b != run_a
    assert [spool.log_epoch(run_b, step, {"loss": 3.0 - step}) for step in (0, 1)] == [True, True]
    tags = runs.client.get_run(run_b).data.tags
    assert tags["lpt.first_run_id"] == run_a and tags["lpt.sweep"] == f"{sweep}-b"
    assert tags[MLFLOW_PARENT_RUN_ID] == parent_b
    assert [m.value for m in runs.client.get_metric_history(run_a, "loss")] == [2.0, 1.0]
    assert runs.client.get_run(run_a).info.status == "FINISHED"
    # a retry of B's trial continues B's run, and its own steps stay logged once
    assert runs.stage_run(parent_b, f"{sweep}-b", f"phase1-{sweep}", "phase1", {}, {}) == run_b
    assert not MetricSpool(runs.client).log_epoch(run_b, 1, {"loss": 9.0})
    assert "lpt.first_run_id" not in runs.client.get_run(run_a).data.tags


def test_a_create_whose_answer_was_lost_is_not_sent_twice(uri: str, sweep: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An overloaded server creates the run but the client times out: the retry finds the run instead of making a
    second one for the same stage."""
    runs = RunRegistry(uri, "lpt-test")
    create = runs.client.create_run
    lost: list[str] = []

    def answer_lost_once(*args, **kwargs):
        run = create(*args, **kwargs)
        if not lost:
            lost.append(run.info.run_id)
            raise requests.exceptions.ReadTimeout("Read timed out. (read timeout=10)")
        return run

    monkeypatch.setattr(runs.client, "create_run", answer_lost_once)
    parent = runs.parent_run(sweep, {})
    assert [parent] == lost
    run_id = runs.stage_run(parent, sweep, "phase2-abc", "phase2 m=5 seed=0", {"prompt.pool_size": 5}, {})
    held = runs.client.search_runs([runs.experiment_id], f"tags.`lpt.sweep` = '{sweep}'")
    assert sorted(r.info.run_id for r in held) == sorted([parent, run_id])  # one parent, one stage run
    assert runs.client.get_run(run_id).data.params == {"prompt.pool_size": "5"}
