"""One writer per tracking store on a cluster.

Trials on several nodes must not write one SQLite file: its locking does not hold across the nodes of a network
filesystem (SQLite's own documentation; MLflow and Optuna users report locked and corrupt stores), and hundreds of
trials connecting straight to a database server exhaust its connections. So on a cluster of more than one node
(`tracking.server=auto`; `on` does it anywhere) the driver starts one `mlflow server` on its own node over the
configured store, and the driver and every trial talk to that server over HTTP: the server is the store's only
writer. The server's log is the sweep folder's mlflow-server.log; if it dies the driver starts it again on the same
port, and what the trials logged meanwhile waits in their metric spools (registry.MetricSpool), as it does through
any tracking outage. Artifacts are not database rows: the experiment's artifact folder stays on the shared
filesystem (registry.artifact_root), where each trial writes its files.

Concurrent sweeps on one SQLite store are kept to one node too: each driver writing a SQLite store (directly, or
through its server) leaves a lease beside the file (<store>.writers/<host>-<pid>.json, renewed every
LEASE_RENEW_S), and a driver on another host refuses to start while a fresh lease of another host is there.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import requests

from lpt_core.config import ConfigError
from lpt_core.files import atomic_write_bytes
from orchestration.tracking.registry import redact

SERVER_LOG = "mlflow-server.log"
LEASE_RENEW_S, LEASE_STALE_S = 20.0, 90.0
START_TIMEOUT_S = 180.0
SERVER_RESTARTS = 5
SERVER_WORKERS = 4  # over a database server (postgresql://...)
# MLflow's log_batch holds one pooled database connection while the params, metrics and tags it logs each take
# another, and each server process serves up to anyio's 40 worker threads at once: SQLAlchemy's default pool (5 + 10
# overflow) is held whole by 15 concurrent requests that all wait for a second connection, until the pool times out
# ("QueuePool limit of size 5 overflow 10 reached": 22 of 40 trials that started logging together failed). So a
# SQLite store gets no pool (a connection is a file open) and a database server a pool that may grow to two
# connections per thread.
SERVER_THREADS = 40


class TrackingError(RuntimeError):
    """The tracking store cannot be written safely (another node writes it) or its server would not start."""


def is_server(uri: str) -> bool:
    """A URI that is already a tracking server (HTTP, Databricks) rather than a store a client opens itself."""
    return uri.startswith(("http://", "https://", "databricks"))


def sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def needs_server(mode: str, store_uri: str, nodes: int) -> bool:
    """Whether the sweep reaches its store through a server of its own. tracking.server=off with a SQLite store on
    several nodes is refused: every node's trials would write the one file."""
    if is_server(store_uri):
        return False
    if mode == "off":
        if nodes > 1 and sqlite_file(store_uri) is not None:
            raise ConfigError(
                f"tracking.server=off: the trials on the {nodes} nodes of this cluster would each write the SQLite "
                f"store {redact(store_uri)}, whose locking does not hold across nodes (a locked or corrupt "
                f"store). Leave tracking.server=auto (the sweep then starts one mlflow server on this node, the "
                f"store's only writer), or set tracking.uri to an mlflow server or a PostgreSQL database")
        return False
    return mode == "on" or nodes > 1


def server_environment(store_uri: str) -> dict[str, str]:
    """The environment of the store's `mlflow server`: its URI (`ps` shows a command line, not this), a database
    connection pool that concurrent trials cannot exhaust (SERVER_THREADS), and no job execution (MLflow's GenAI
    jobs: a runner and six huey consumers, seven more interpreters beside every sweep, none of them used by one).
    A setting of the user's wins."""
    pool = ({"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"} if sqlite_file(store_uri) is not None
            else {"MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(2 * SERVER_THREADS)})
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **pool, **os.environ,
            "MLFLOW_BACKEND_STORE_URI": store_uri}


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class TrackingServer:
    """`mlflow server` over one store, on this node: started, waited for (its /health answers), watched (started
    again on the same port if it exits), stopped."""

    def __init__(self, store_uri: str, artifacts: Path | None, host: str, port: int, log_path: Path,
                 log: Callable[[str], None] = print) -> None:
        self.store_uri, self.artifacts, self.host, self.log_path, self.log = store_uri, artifacts, host, log_path, log
        self.port = port or _free_port(host)
        # one process for a SQLite file (its locking is all that orders writers; one process needs none of it),
        # several for a database server, which orders concurrent writers itself
        self.workers = 1 if sqlite_file(store_uri) is not None else SERVER_WORKERS
        self.uri = f"http://{host}:{self.port}"
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None

    def _command(self) -> list[str]:
        hosts = {self.host, socket.gethostname(), "localhost", "127.0.0.1"}
        command = [sys.executable, "-m", "mlflow", "server",  # the store's URI: server_environment
                   "--host", self.host, "--port", str(self.port), "--workers", str(self.workers),
                   "--allowed-hosts", ",".join(sorted(f"{h}{suffix}" for h in hosts for suffix in ("", ":*")))]
        if self.artifacts is not None:
            command += ["--artifacts-destination", str(self.artifacts)]
        return command

    def _launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as out:
            out.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} mlflow server on {self.uri} "
                      f"over {redact(self.store_uri)}\n")
            out.flush()
            self._proc = subprocess.Popen(self._command(), stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env=server_environment(self.store_uri))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
                raise TrackingError(f"the tracking server over {redact(self.store_uri)} exited with code "
                                    f"{self._proc.returncode} at start ({self.log_path}):\n" + "\n".join(tail))
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            time.sleep(0.25)
        self._terminate()
        raise TrackingError(f"the tracking server over {redact(self.store_uri)} did not answer on {self.uri} within "
                            f"{START_TIMEOUT_S:g}s ({self.log_path})")

    @property
    def pid(self) -> int | None:
        """The server's process (the leader of its process group)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        self._launch()
        self._watch = threading.Thread(target=self._keep_alive, name="tracking-server-watch", daemon=True)
        self._watch.start()

    def _keep_alive(self) -> None:
        """Starts the server again where it exited while the sweep runs (the trials' spools bridge the gap)."""
        while not self._stopping.wait(1.0):
            if self._proc is None or self._proc.poll() is None:
                continue
            if self.restarts >= SERVER_RESTARTS:
                self.log(f"tracking: the server on {self.uri} exited {self.restarts + 1} times; not restarted. The "
                         f"trials keep their metrics in their spools (lpt-replay-metrics sends them later)")
                return
            self.restarts += 1
            self._terminate()  # what is left of its process group
            self.log(f"tracking: the server on {self.uri} exited (code {self._proc.returncode}); starting it again "
                     f"(restart {self.restarts}/{SERVER_RESTARTS}, log {self.log_path})")
            try:
                self._launch()
            except TrackingError as err:
                self.log(f"tracking: {err}")

    def _terminate(self) -> None:
        """Ends the server's whole process group: `mlflow server` runs its web server as a child process, which
        would go on serving (and holding the port) after its parent alone ended."""
        if self._proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self._proc.poll()  # reaps the leader, so that only live members keep the group
                if not _group_alive(self._proc.pid):
                    return
                time.sleep(0.1)

    def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.join(10)
        self._terminate()


class StoreLease:
    """This driver's claim to write a SQLite store from this host (see the module docstring)."""

    def __init__(self, store: Path, sweep: str, via: str | None) -> None:
        self.folder = store.with_name(store.name + ".writers")
        self.host = socket.gethostname()
        self.path = self.folder / f"{self.host}-{os.getpid()}.json"
        self.record = {"host": self.host, "pid": os.getpid(), "sweep": sweep, "via": via,
                       "since": datetime.datetime.now().isoformat(timespec="seconds")}
        self._stopping = threading.Event()
        self._renew: threading.Thread | None = None

    def others(self) -> list[dict]:
        """The fresh leases of other hosts."""
        found = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                if record.get("host") != self.host and time.time() - path.stat().st_mtime < LEASE_STALE_S:
                    found.append(record)
        return found

    def _write(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.record).encode())

    def _keep_fresh(self) -> None:
        while not self._stopping.wait(LEASE_RENEW_S):
            with contextlib.suppress(OSError):
                self._write()

    def take(self, store_uri: str) -> None:
        others = self.others()
        if others:
            held = "; ".join(f"host {o['host']} (sweep {o['sweep']!r}, pid {o['pid']}, since {o['since']}"
                             + (f", through its server {o['via']}" if o.get("via") else "") + ")" for o in others)
            raise TrackingError(
                f"the SQLite store {redact(store_uri)} is being written from another node: {held}. SQLite's "
                f"locking does not hold across nodes, so this sweep would risk a locked or corrupt store; nothing "
                f"was started. Run this sweep on that node, wait until that sweep ends (its lease lapses "
                f"{LEASE_STALE_S:g}s after it stops), or give both sweeps a shared database: tracking.uri="
                f"postgresql://... or an mlflow server (README: A team's store)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write()
        self._renew = threading.Thread(target=self._keep_fresh, name="tracking-lease", daemon=True)
        self._renew.start()

    def release(self) -> None:
        self._stopping.set()
        if self._renew is not None:
            self._renew.join(5)
        self.path.unlink(missing_ok=True)


def node_address() -> str:
    """This node's address as the other nodes of the Ray cluster reach it."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


@contextlib.contextmanager
def single_writer(store_uri: str, mode: str, port: int, nodes: int, artifacts: Path | None, folder: Path,
                  sweep: str, log: Callable[[str], None] = print) -> Iterator[str]:
    """The URI the driver and the trials write to for the `with` block: the store itself on one node, else the
    sweep's own server over it (started here, stopped at the end)."""
    routed = needs_server(mode, store_uri, nodes)
    server = None
    if routed:
        host = "127.0.0.1" if nodes <= 1 else node_address()
        server = TrackingServer(store_uri, artifacts, host, port, folder / SERVER_LOG, log)
    store = sqlite_file(store_uri)
    lease = StoreLease(store, sweep, server.uri if server else None) if store is not None else None
    if lease is not None:
        lease.take(store_uri)
    try:
        if server is None:
            yield store_uri
            return
        server.start()
        where = f"{nodes} nodes" if nodes > 1 else "tracking.server=on"
        log(f"tracking: {where}: every trial reaches {redact(store_uri)} through one mlflow server on this node, "
            f"its only writer: {server.uri} (pid {server.pid}, log {server.log_path}). Its UI, from your machine: "
            f"ssh -N -L 5000:{server.host}:{server.port} <a login node that reaches {socket.gethostname()}>, then open "
            f"http://127.0.0.1:5000 (it stops with the sweep; afterwards serve the store with mlflow ui)")
        try:
            yield server.uri
        finally:
            server.stop()
    finally:
        if lease is not None:
            lease.release()
