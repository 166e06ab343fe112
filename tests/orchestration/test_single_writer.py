"""One writer per tracking store: when a sweep routes through its own mlflow server, the server restarts where it
dies, and a SQLite store is written from one host at a time."""
from __future__ import annotations

import json
import multiprocessing
import re
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import requests
from mlflow.entities import Metric, Param

from lpt_core.config import ConfigError
from orchestration.tracking.registry import MetricSpool, RunRegistry
from orchestration.tracking.single_writer import (LEASE_STALE_S, StoreLease, TrackingError, TrackingServer,
                                                  needs_server, server_environment, single_writer)

SQLITE = "sqlite:////shared/sweeps/mlflow.db"


@pytest.mark.parametrize("mode, uri, nodes, routed", [
    ("auto", SQLITE, 1, False),  # one node: the file's own locking holds
    ("auto", SQLITE, 3, True),
    ("auto", "postgresql://lpt@db:5432/lpt", 3, True),  # hundreds of trials would each open a connection
    ("auto", "postgresql://lpt@db:5432/lpt", 1, False),
    ("on", SQLITE, 1, True),
    ("off", "postgresql://lpt@db:5432/lpt", 3, False),  # a database server takes writers from many nodes
    ("auto", "http://head:5000", 3, False),  # already a server
    ("on", "https://mlflow.example.org", 1, False),
])
def test_which_sweeps_go_through_a_server_of_their_own(mode: str, uri: str, nodes: int, routed: bool) -> None:
    assert needs_server(mode, uri, nodes) is routed


def test_sqlite_written_from_several_nodes_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError) as refused:
        needs_server("off", SQLITE, 2)
    message = str(refused.value)
    assert message.startswith("tracking.server=off: the trials on the 2 nodes")
    assert "sqlite:////shared/sweeps/mlflow.db" in message and "tracking.server=auto" in message


def _lease_of(store: Path, host: str, age_s: float = 0.0) -> Path:
    folder = store.with_name(store.name + ".writers")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{host}-4242.json"
    path.write_text(json.dumps({"host": host, "pid": 4242, "sweep": "group_size-demo", "via": "http://10.0.0.7:5001",
                                "since": "2026-12-06T10:00:00"}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_fresh_lease_of_another_host_refuses_the_store(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    _lease_of(store, "gpu-node-7")
    lease = StoreLease(store, "mine", None)
    with pytest.raises(TrackingError) as refused:
        lease.take(f"sqlite:///{store}")
    message = str(refused.value)
    assert "host gpu-node-7 (sweep 'group_size-demo', pid 4242, since 2026-12-06T10:00:00, through its server " \
           "http://10.0.0.7:5001)" in message
    assert "postgresql://" in message and not lease.path.exists()


def test_stale_leases_and_this_hosts_own_do_not_refuse(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    _lease_of(store, "gpu-node-7", age_s=LEASE_STALE_S + 5)  # a driver killed long ago
    lease = StoreLease(store, "mine", None)
    _lease_of(store, lease.host)  # another sweep on this very host: the file's locking holds between them
    lease.take(f"sqlite:///{store}")
    assert json.loads(lease.path.read_text())["sweep"] == "mine"
    lease.release()
    assert not lease.path.exists()


def test_the_servers_environment_holds_its_store_a_pool_that_cannot_run_out_and_no_jobs(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", raising=False)
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    sqlite = server_environment(SQLITE)
    assert sqlite["MLFLOW_BACKEND_STORE_URI"] == SQLITE and sqlite["MLFLOW_SQLALCHEMYSTORE_POOLCLASS"] == "NullPool"
    assert sqlite["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    database = server_environment("postgresql://lpt:secret@db:5432/mlflow")
    assert "MLFLOW_SQLALCHEMYSTORE_POOLCLASS" not in database
    assert database["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"] == "80"  # two connections for each of 40 threads
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "QueuePool")  # a user's own setting wins
    assert server_environment(SQLITE)["MLFLOW_SQLALCHEMYSTORE_POOLCLASS"] == "QueuePool"


def test_single_writer_on_one_node_hands_out_the_store_and_leaves_no_lease(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with single_writer(uri, "auto", 0, 1, tmp_path / "mlartifacts", tmp_path, "s", log=print) as endpoint:
        assert endpoint == uri
        (lease,) = (tmp_path / "mlflow.db.writers").glob("*.json")
        assert json.loads(lease.read_text())["via"] is None
    assert list((tmp_path / "mlflow.db.writers").glob("*.json")) == []


def _metric_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute("select run_uuid, key, step, value from metrics order by run_uuid, key, step"
                                  ).fetchall()


@pytest.mark.slow
def test_the_server_is_the_only_writer_and_comes_back_where_it_died(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    lines: list[str] = []
    with single_writer(f"sqlite:///{db}", "on", 0, 1, tmp_path / "mlartifacts", tmp_path, "s",
                       log=lines.append) as endpoint:
        assert endpoint.startswith("http://127.0.0.1:") and requests.get(f"{endpoint}/health", timeout=5).ok
        runs = RunRegistry(endpoint, "demo", artifacts=tmp_path / "mlartifacts")
        run = runs.parent_run("s", {})
        spool = MetricSpool(runs.client, tmp_path / "spool")
        assert spool.log_epoch(run, 0, {"acc": 1.0})
        server: TrackingServer = _server_of(lines)
        # the store's URI (a password in it) reaches the server through its environment: `ps` shows the command
        assert str(db).encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        os.killpg(server._proc.pid, signal.SIGKILL)  # the server dies mid-sweep, web workers and all
        server._proc.wait()
        spool.log_epoch(run, 1, {"acc": 2.0})  # sent now or spooled until the server is back
        assert spool.flush(timeout_s=120), "the server did not come back"
        spool.log_epoch(run, 1, {"acc": 2.0})  # a retried epoch is not logged twice
        assert any("exited (code -9); starting it again (restart 1/5" in line for line in lines)
        assert endpoint == server.uri  # the same port: the trials' URI still holds
    assert not _serving(endpoint)
    rows = _metric_rows(db)
    assert [(key, step, value) for _, key, step, value in rows] == [
        ("acc", 0, 1.0), ("acc", 1, 2.0), ("epoch", 0, 0.0), ("epoch", 1, 1.0)]
    experiment = RunRegistry(f"sqlite:///{db}", "demo").client.get_experiment_by_name("demo")
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "demo").as_uri()
    assert "mlflow server on http://127.0.0.1:" in (tmp_path / "mlflow-server.log").read_text()


TRIALS, EPOCHS = 40, 3  # enough at once to hang the default pool every time (24 did not always)


def _trial_logging(uri: str, run_id: str, start_at: float, errors) -> None:
    """What a trial process sends per run: its params, then EPOCHS epochs of metrics; an error that reaches it is
    put on `errors`."""
    try:
        client = RunRegistry(uri, "demo").client
        time.sleep(max(0.0, start_at - time.time()))
        client.log_batch(run_id, params=[Param(f"p{k}", str(k)) for k in range(40)])
        for step in range(EPOCHS):
            client.log_batch(run_id, metrics=[Metric(f"m{k}", float(k), 0, step) for k in range(8)])
    except Exception as err:
        errors.put(f"{type(err).__name__}: {err}"[:300])


@pytest.mark.slow
def test_trials_logging_at_once_through_the_server_all_succeed(tmp_path: Path) -> None:
    """MLflow's log_batch holds one pooled database connection while its params and metrics each take another: with
    SQLAlchemy's default pool (5 + 10), fifteen requests at once hold every connection and wait for a second until
    the pool times out (`QueuePool limit of size 5 overflow 10 reached`: with that pool every one of these trial
    processes failed). The server is started with a pool that cannot run out."""
    db = tmp_path / "mlflow.db"
    context = multiprocessing.get_context("fork")  # trial processes without an interpreter start-up each
    errors = context.Queue()
    with single_writer(f"sqlite:///{db}", "on", 0, 1, tmp_path / "mlartifacts", tmp_path, "s",
                       log=lambda line: None) as endpoint:
        runs = RunRegistry(endpoint, "demo")
        parent = runs.parent_run("s", {})
        run_ids = [runs.stage_run(parent, "s", f"key-{i}", f"trial-{i}", {}, {}) for i in range(TRIALS)]
        start_at = time.time() + 5  # every process forked and ready: they send at once
        trials = [context.Process(target=_trial_logging, args=(endpoint, run_id, start_at, errors))
                  for run_id in run_ids]
        for trial in trials:
            trial.start()
        for trial in trials:
            trial.join()
    assert [trial.exitcode for trial in trials] == [0] * TRIALS
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    assert reported == []
    with sqlite3.connect(db) as connection:
        assert connection.execute("select count(*) from metrics").fetchone() == (TRIALS * EPOCHS * 8,)
        assert connection.execute("select count(*) from params").fetchone() == (TRIALS * 40,)


def _server_of(lines: list[str]) -> TrackingServer:
    """The TrackingServer the context manager started (found through the watch thread that holds it)."""
    import threading

    (watch,) = [t for t in threading.enumerate() if t.name == "tracking-server-watch"]
    return watch._target.__self__


def _serving(uri: str) -> bool:
    try:
        return requests.get(f"{uri}/health", timeout=2).ok
    except requests.RequestException:
        return False


THREE_NODES_SCRIPT = r"""
import json, os, re, signal, sys, threading, time
from pathlib import Path
from ray.cluster_utils import Cluster
from experiments.compose import compose_config
from orchestration.execute.driver import run_sweep

overrides, events = json.loads(sys.argv[1]), Path(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
lines, outcome = [], {}
def log(line):
    lines.append(line)
    print(line, flush=True)
worker = threading.Thread(target=lambda: outcome.update(
    rc=run_sweep(compose_config(overrides + ["cluster=ray", f"cluster.address={cluster.address}"]), log=log)))
worker.start()
deadline = time.monotonic() + 900
while not (events / "phase2.5.seed0.epoch1").exists():  # the trial holds there until released
    assert time.monotonic() < deadline and worker.is_alive(), "no phase-2 epoch-1 event"
    time.sleep(0.2)
(pid,) = [int(m[1]) for line in lines if (m := re.search(r"one mlflow server .*\(pid (\d+),", line))]
os.killpg(pid, signal.SIGKILL)  # the store's only writer dies in the middle of the sweep
print("SERVER KILLED", flush=True)
(events / "release").write_text("")
worker.join(900)
print("RC", outcome.get("rc"), flush=True)
"""


@pytest.mark.slow
def test_a_three_node_sweep_writes_its_sqlite_store_through_one_server(sweep_overrides, tmp_path):
    """Trials on two worker nodes never open the SQLite file: the driver's server writes it, comes back when it
    is killed mid-trial, and every epoch reaches the store exactly once."""
    import subprocess
    import sys

    from .conftest import REPO, mlflow_runs, stage_runs, steps

    events = tmp_path / "events"
    overrides = sweep_overrides("ablation=group_size", "ablation.values=[5,10]", "fuse=off",
                                f"debug.event_dir={events}", "debug.hold_at_epoch=1", "debug.fail_stage=phase2",
                                "debug.fail_row=5")
    proc = subprocess.run([sys.executable, "-c", THREE_NODES_SCRIPT, json.dumps(overrides), str(events)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    output = proc.stdout + proc.stderr
    assert "SERVER KILLED" in output and "RC 0" in output, output[-5000:]
    store = tmp_path / "sweeps" / "mlflow.db"
    assert f"tracking: 3 nodes: every trial reaches sqlite:///{store} through one mlflow server" in output
    assert "exited (code -9); starting it again (restart 1/5" in output
    client, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    assert sorted(r.data.tags.get("lpt.stage", "sweep") for r in runs) == ["phase1", "phase2", "phase2", "sweep"]
    assert all(r.info.status == "FINISHED" for r in runs)
    (phase1,) = stage_runs(runs, "phase1")
    assert steps(client, phase1) == [0, 1]
    for run in stage_runs(runs, "phase2"):
        assert steps(client, run) == [0, 1, 2]  # each epoch once, the one logged across the restart too
    assert list((tmp_path / "sweeps" / "mlflow.db.writers").glob("*.json")) == []
    server_url = re.search(r"its only writer: (http://\S+) ", output)[1]
    assert not _serving(server_url)  # stopped with the sweep
    folder = tmp_path / "sweeps" / "group_size-demo"
    assert "mlflow server on http://" in (folder / "mlflow-server.log").read_text()
    # the report names the store, not the server that stopped with the sweep
    assert f"point estimates from MLflow (sqlite:///{store})" in (folder / "report" / "report.md").read_text()


@pytest.mark.slow
def test_a_sweep_on_another_host_than_the_stores_writer_is_refused_and_writes_nothing(sweep_command, sweep_overrides,
                                                                                  tmp_path):
    store = tmp_path / "sweeps" / "mlflow.db"
    lease = _lease_of(store, "gpu-node-7")  # a sweep on another node writes this store right now
    done = sweep_command(sweep_overrides("ablation=group_size", "ablation.values=[5]"))
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: the SQLite store sqlite:///{store} is being written from another node: host "
                            f"gpu-node-7 (sweep 'group_size-demo', pid 4242")
    assert not (tmp_path / "sweeps" / "group_size-demo").exists()  # no sweep folder left behind
    assert not store.exists() and lease.exists()  # the store untouched, the other sweep's lease kept
