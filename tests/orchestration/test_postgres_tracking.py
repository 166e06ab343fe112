"""MLflow on a real PostgreSQL server (a team's shared store, tests/orchestration/postgres.py): tiny demo sweeps
tracked in it directly, with the password from libpq's environment or in the URI (redacted everywhere), and behind
an `mlflow server` over it; a wrong or missing password stops the sweep before anything is trained or written, and
a driver that crashes prints no password of its command line."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest
import requests
from mlflow.tracking import MlflowClient

from experiments.compose import compose_config
from orchestration.execute.driver import run_sweep
from orchestration.plan.record import PlanRecord
from orchestration.tracking.single_writer import server_environment
from orchestration.tracking.store_check import TrackingStoreError, check_store

from .conftest import ONE_SLOT, run_sweep_cli, stage_runs, steps
from .postgres import Postgres, free_port, postgres_for_test

SWEEP = "group_size-demo"
EPOCHS = {"phase1": [0, 1], "phase2": [0, 1, 2]}  # phase1.epochs=2, phase2.epochs=3 in conftest.TINY_DEMO


@pytest.fixture
def postgres(tmp_path, tmp_path_factory, monkeypatch):
    """A real PostgreSQL server of this test (tests/orchestration/postgres.py); skips where it is not installed."""
    with postgres_for_test(tmp_path, tmp_path_factory, monkeypatch) as server:
        yield server


def _runs(client: MlflowClient, experiment: str = "demo", sweep: str = SWEEP) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], f"tags.`lpt.sweep` = '{sweep}'", max_results=1000)


def _check_tracked(client: MlflowClient, runs: list, rows: list[str], artifacts: Path) -> None:
    """One parent FINISHED with its report, phase 1 once, one phase 2 per row, each stage FINISHED with each
    epoch's metrics exactly once; the artifact files in `artifacts` (<run id>/artifacts/... below it)."""
    (parent,) = [r for r in runs if r.data.tags.get("lpt.role") == "sweep"]
    assert parent.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "report")] == [
        "report/axis.png", "report/matches.png", "report/report.csv", "report/report.md"]
    report = artifacts / parent.info.run_id / "artifacts" / "report" / "report.md"
    assert report.read_text().rstrip("\n") == parent.data.tags["mlflow.note.content"]
    (phase1,) = stage_runs(runs, "phase1")
    phase2 = stage_runs(runs, "phase2")
    assert sorted(r.data.tags["lpt.row"] for r in phase2) == rows
    assert len(runs) == 2 + len(rows)
    for run in [phase1, *phase2]:
        stage = run.data.tags["lpt.stage"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for metric in ("epoch", "loss", "acc"):
            assert steps(client, run, metric) == EPOCHS[stage], (stage, metric)
    for run in phase2:
        files = artifacts / run.info.run_id / "artifacts"
        assert (files / "per_class.parquet").stat().st_size > 0 and (files / "match.parquet").stat().st_size > 0
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"final", "per_class.parquet",
                                                                            "match.parquet"}


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------ the server and the driver's check


def test_the_server_takes_the_role_over_tcp_with_its_password_only(postgres, tmp_path, monkeypatch):
    dsn = dict(host=postgres.host, port=postgres.port, dbname="lpt", user="lpt", connect_timeout=10)
    with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
        psycopg2.connect(**dsn)
    with pytest.raises(psycopg2.OperationalError, match='password authentication failed for user "lpt"'):
        psycopg2.connect(**dsn, password="wrong")
    monkeypatch.setenv("PGPASSFILE", str(postgres.write_passfile(tmp_path / "pgpass")))
    with psycopg2.connect(**dsn) as conn, conn.cursor() as cur:
        cur.execute("select current_user, current_database(), setting from pg_settings "
                    "where name = 'password_encryption'")
        assert cur.fetchone() == ("lpt", "lpt", "scram-sha-256")


def test_the_store_check_names_the_redacted_uri_and_the_database_reason(postgres, tmp_path, monkeypatch):
    redacted = f"tracking.uri=postgresql://***@127.0.0.1:{postgres.port}"
    with pytest.raises(TrackingStoreError) as wrong:
        check_store(postgres.uri("not-the-password"))
    message = str(wrong.value)
    assert message.startswith(f"{redacted}/lpt: cannot open the postgresql store: ")
    assert 'password authentication failed for user "lpt"' in message and "not-the-password" not in message
    assert message.endswith("nothing was trained or written; give the password in ~/.pgpass or the file PGPASSFILE "
                            "names (mode 0600), or in PGPASSWORD, not on the command line (README: A team's store)")
    with pytest.raises(TrackingStoreError, match="no password supplied"):
        check_store(postgres.uri())  # the fixture's PGPASSFILE is empty
    with pytest.raises(TrackingStoreError, match=re.escape(redacted) + '/nodb: .* database "nodb" does not exist'):
        check_store(f"postgresql://lpt:{postgres.password}@127.0.0.1:{postgres.port}/nodb")
    check_store(postgres.uri(postgres.password))
    monkeypatch.setenv("PGPASSFILE", str(postgres.write_passfile(tmp_path / "pgpass")))
    check_store(postgres.uri())
    with pytest.raises(TrackingStoreError, match=r"no module 'pg8000'\): pip install 'pg8000'"):
        check_store(f"postgresql+pg8000://lpt@127.0.0.1:{postgres.port}/lpt")
    for unchecked in ("http://127.0.0.1:9", f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}"):
        check_store(unchecked)
    assert not (tmp_path / "absent").exists()


# ------------------------------------------------------------------ tiny sweeps tracked in PostgreSQL


@pytest.mark.slow
def test_sweep_tracked_in_postgresql_with_the_password_from_the_environment(postgres, sweep_overrides, tmp_path,
                                                                           monkeypatch):
    """The password only in the file PGPASSFILE names. The trials log from Ray's worker processes, which inherit
    the environment of the Ray that starts them: a Ray started before the variable was set (the session's
    ray_session) would leave them without it, so this sweep runs as a user types it, in a process of its own that
    starts its own Ray with the variable in its environment."""
    monkeypatch.setenv("PGPASSFILE", str(postgres.write_passfile(tmp_path / "pgpass")))
    # one trial slot: the two rows fused into one trial, its phase 1 trained at its head (one trial process)
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[5,10]", f"tracking.uri={postgres.uri()}",
                                ONE_SLOT)
    done = run_sweep_cli(overrides, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ray: local" in done.stdout  # the sweep's own Ray, started by its driver

    client = MlflowClient(postgres.uri())
    artifacts = tmp_path / "sweeps" / "mlartifacts" / "demo"
    assert client.get_experiment_by_name("demo").artifact_location == artifacts.as_uri()
    _check_tracked(client, _runs(client), ["10", "5"], artifacts)
    assert not (tmp_path / "sweeps" / "mlflow.db").exists()  # the default store was not used
    assert PlanRecord.read(tmp_path / "sweeps" / SWEEP).tracking_uri == \
        f"postgresql://***@127.0.0.1:{postgres.port}/lpt"


@pytest.mark.slow
def test_a_password_in_the_uri_is_redacted_everywhere(ray_session, postgres, sweep_overrides, tmp_path, capsys):
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[10]",
                                f"tracking.uri={postgres.uri(postgres.password)}")
    lines: list[str] = []
    assert run_sweep(compose_config(overrides), log=lines.append) == 0
    printed = capsys.readouterr()

    client = MlflowClient(postgres.uri(postgres.password))
    artifacts = tmp_path / "sweeps" / "mlartifacts" / "demo"
    experiment = client.get_experiment_by_name("demo")
    assert experiment.artifact_location == artifacts.as_uri()
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    _check_tracked(client, runs, ["10"], artifacts)
    redacted = f"postgresql://***@127.0.0.1:{postgres.port}/lpt"
    (parent,) = [r for r in runs if r.data.tags.get("lpt.role") == "sweep"]
    assert parent.data.tags["lpt.tracking_uri"] == redacted
    assert f"serve the store with\n    mlflow ui --backend-store-uri {redacted} " in "\n".join(lines)

    secret = postgres.password
    for run in runs:
        for where, values in (("param", run.data.params), ("tag", run.data.tags)):
            assert not [key for key, value in values.items() if secret in key or secret in value], (where, run)
    assert not [key for key, value in experiment.tags.items() if secret in value]
    folder = tmp_path / "sweeps" / SWEEP
    for name in ("plan.json", "state.json", "trials.json", "report/report.md"):
        assert (folder / name).is_file() and secret not in (folder / name).read_text(), name
    leaked = [path for path in [*(tmp_path / "sweeps").rglob("*"), *(tmp_path / "stages").rglob("*")]
              if path.is_file() and secret.encode() in path.read_bytes()]
    assert leaked == []
    assert secret not in "\n".join(lines) and secret not in printed.out and secret not in printed.err


class MlflowOverPostgres:
    """`mlflow server` over the PostgreSQL store, its password in the file PGPASSFILE names in its environment."""

    def __init__(self, postgres: Postgres, folder: Path, passfile: Path) -> None:
        self.port, self.artifacts, self.log = free_port(), folder / "artifacts", folder / "mlflow-server.log"
        self.uri = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres.uri(),
                   "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**server_environment(postgres.uri()), "PGPASSFILE": str(passfile)},
                                         start_new_session=True)

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, f"mlflow server exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server not up:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM to its process group: the server, its uvicorn worker and its job consumers (the server alone
        takes 30 s to go and leaves the consumers running)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    server = MlflowOverPostgres(postgres, tmp_path, postgres.write_passfile(tmp_path / "server-pgpass"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_sweep_behind_an_mlflow_server_over_postgresql(ray_session, postgres, mlflow_server, sweep_overrides,
                                                       tmp_path, monkeypatch):
    """The team's setup: the server alone holds the database password (the sweep's own environment has none) and
    keeps the artifacts in its --artifacts-destination."""
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[10]", f"tracking.uri={mlflow_server.uri}")
    assert run_sweep(compose_config(overrides), log=lambda line: None) == 0

    monkeypatch.setenv("PGPASSFILE", str(postgres.write_passfile(tmp_path / "pgpass")))
    direct, served = MlflowClient(postgres.uri()), MlflowClient(mlflow_server.uri)
    experiment = direct.get_experiment_by_name("demo")
    assert experiment.artifact_location == f"mlflow-artifacts:/{experiment.experiment_id}"
    runs = _runs(direct)
    assert sorted(r.info.run_id for r in runs) == sorted(r.info.run_id for r in _runs(served))
    _check_tracked(served, runs, ["10"], mlflow_server.artifacts / experiment.experiment_id)
    assert not (tmp_path / "sweeps" / "mlflow.db").exists() and not (tmp_path / "sweeps" / "mlartifacts").exists()


@pytest.mark.slow
def test_a_wrong_password_stops_the_sweep_before_anything_is_trained(ray_session, postgres, sweep_overrides,
                                                                    sweep_command, tmp_path, monkeypatch):
    """The refused sweeps run as `lpt-sweep` runs them (sweep_command), with the driver's connection to Ray made to
    fail the test: stopped before Ray is what they must show."""
    good = postgres.uri(postgres.password)
    assert run_sweep(compose_config(sweep_overrides("ablation=group_size", "ablation.values=[10]",
                                                    f"tracking.uri={good}")), log=lambda line: None) == 0
    client = MlflowClient(good)
    before_runs = {r.info.run_id: (r.info.status, r.info.end_time) for r in _runs(client)}
    assert len(before_runs) == 3
    before_files = _files(tmp_path / "sweeps")
    before_stages = _files(tmp_path / "stages")
    redacted = f"postgresql://***@127.0.0.1:{postgres.port}/lpt"

    # the same sweep, the wrong password in the URI; and a new sweep with no password at all (none in the URI,
    # PGPASSFILE empty)
    def no_ray(*args, **kwargs):
        raise AssertionError("the refused sweep got as far as connecting to Ray")

    monkeypatch.setattr("orchestration.execute.driver.connect", no_ray)
    for uri, sweep, reason in ((postgres.uri("wrong-password"), SWEEP, 'password authentication failed for user "lpt"'),
                               (postgres.uri(), "second", "fe_sendauth: no password supplied")):
        done = sweep_command(sweep_overrides("ablation=group_size", "ablation.values=[10]", f"tracking.uri={uri}",
                                             f"sweep.name={sweep}"))
        assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
        error = done.stderr.strip().splitlines()[-1]
        assert error.startswith(f"error: tracking.uri={redacted}: cannot open the postgresql store: ")
        assert reason in error and error.endswith("not on the command line (README: A team's store)")
        assert "Traceback" not in done.stderr and "wrong-password" not in done.stderr + done.stdout
        assert "ray:" not in done.stdout and "pretraining" not in done.stdout  # stopped before Ray and training
        assert "SQLAlchemy engine could not be created" not in done.stderr  # not MLflow's ~100 s of retries
    assert not (tmp_path / "sweeps" / "second").exists()
    # the lock file names the last driver that took the lock (the refused ones did, to read the sweep's state)
    lock = {f"{SWEEP}/.lock": None}
    assert {**_files(tmp_path / "sweeps"), **lock} == {**before_files, **lock}
    assert _files(tmp_path / "stages") == before_stages
    assert {r.info.run_id: (r.info.status, r.info.end_time) for r in _runs(client)} == before_runs
    assert _runs(client, sweep="second") == []


@pytest.mark.slow
def test_a_crash_of_the_driver_prints_no_password_of_the_command_line(sweep_command, sweep_overrides, tmp_path):
    """An error the driver does not expect (here: the tracking server is down when the sweep opens its runs) ends
    with its traceback, credentials redacted; Hydra would print the command line's overrides before it."""
    port = free_port()
    done = sweep_command(sweep_overrides("ablation=group_size", "ablation.values=[10]", "tracking.flush_timeout_s=1",
                                         f"tracking.uri=http://lpt:not-to-be-printed@127.0.0.1:{port}"))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.rstrip().splitlines()[-1].startswith("mlflow.exceptions.MlflowException: ")
    assert "Traceback (most recent call last):" in done.stderr
    assert "Error executing job with overrides" not in done.stderr
    assert "not-to-be-printed" not in done.stderr + done.stdout
