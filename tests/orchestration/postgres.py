"""A real PostgreSQL server for one test, entirely under its tmp_path: Debian's postgresql binaries (initdb, postgres,
pg_ctl), a free TCP port on 127.0.0.1 that takes a password only (scram-sha-256), its unix socket in a folder of the
test, a role `lpt` with a random password and its database `lpt`; stopped (pg_ctl stop -m fast) at teardown.

initdb and the server refuse to run as root: as root they run as Debian's `postgres` OS user (runuser), in a folder
given to that user; the folders above it, up to pytest's per-user tmp root, get o+x (traverse, not list) so that it
reaches its folder, again before each command that walks the path, as a pytest session starting meanwhile on the
machine resets that root to 0700 (never restored: a server of another test may need them). The superuser reaches
the server over the unix socket only (peer: as that OS user); over TCP every role needs its password. The test
skips, saying why, where the binaries are not installed (.ci/run installs them).
"""
from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

BINARIES = ("initdb", "postgres", "pg_ctl", "pg_isready", "psql")
SOCKET_NAME_ROOM = len("/.s.PGSQL.65535")
UNIX_PATH_MAX = 107  # sun_path less its terminating NUL


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding every binary (Debian keeps them off PATH), or the
    folder of PATH's initdb."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    return next((c for c in candidates if all((c / name).is_file() for name in BINARIES)), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Postgres:
    bin: Path
    root: Path  # owned by the server's OS user: data/, sock/, server.log
    port: int
    password: str  # of the role lpt
    os_user: str | None  # the OS user the server runs as (None: this process's)
    base: Path | None = None  # pytest's basetemp, above root
    proc: subprocess.Popen | None = None
    user = database = "lpt"
    host = "127.0.0.1"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sockets(self) -> Path:
        return self.root / "sock"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def uri(self, password: str | None = None) -> str:
        """postgresql://lpt@127.0.0.1:<port>/lpt, with a password in it where one is given."""
        auth = self.user if password is None else f"{self.user}:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.database}"

    def write_passfile(self, path: Path, password: str | None = None) -> Path:
        """A libpq password file (0600, or libpq ignores it) for this server's role lpt."""
        path.write_text(f"{self.host}:{self.port}:{self.database}:{self.user}:{password or self.password}\n")
        path.chmod(0o600)
        return path

    def _open_path(self) -> None:
        """Lets the server's OS user walk down to root again (o+x from root up to pytest's per-user tmp root):
        every pytest session that starts meanwhile on this machine resets that root to 0700. Done before each
        command that walks the path (initdb, the server's start, psql, pg_ctl); the running server does not walk
        it: it works in its data folder, and the tests reach it over TCP."""
        if self.os_user is None:
            return
        # pytest's per-user root (0700), also above an xdist worker's own basetemp (pytest-N/popen-gwK)
        top = next((f for f in [self.base, *self.base.parents] if f.name.startswith("pytest-of-")), self.base)
        for folder in [self.root.parent, *self.root.parent.parents]:
            mode = folder.stat().st_mode
            if folder == top or top in folder.parents:
                if not mode & stat.S_IXOTH:
                    folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            elif not mode & stat.S_IXOTH:
                pytest.skip(f"{folder} does not let other users through (mode {stat.S_IMODE(mode):o}): the "
                            f"postgres OS user cannot reach its folder {self.root}")

    def _as_server_user(self, *command: str | Path, **kwargs) -> subprocess.CompletedProcess:
        self._open_path()
        prefix = ["runuser", "-u", self.os_user, "--"] if self.os_user else []
        done = subprocess.run([*prefix, *map(str, command)], capture_output=True, text=True, timeout=120, **kwargs)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, command))} exited with {done.returncode}:\n{done.stdout}"
                                 f"{done.stderr}")
        return done

    def _conf(self) -> str:
        return "\n".join([
            "listen_addresses = '127.0.0.1'", f"port = {self.port}",
            f"unix_socket_directories = '{self.sockets}'", "unix_socket_permissions = 0700",
            "password_encryption = 'scram-sha-256'",
            # a test's server: what a crash of the machine would need is not needed here
            "fsync = off", "synchronous_commit = off", "full_page_writes = off",
            "max_connections = 50", "shared_buffers = 32MB", "logging_collector = off", ""])

    @staticmethod
    def _hba() -> str:
        return ("# the superuser over the unix socket, as its OS user; every role over TCP with its password\n"
                "local all all peer\n"
                "host all all 127.0.0.1/32 scram-sha-256\n")

    def start(self, timeout_s: float = 120.0) -> None:
        self.data.mkdir()
        self.sockets.mkdir()
        if self.os_user:
            for path in (self.root, self.data, self.sockets):
                shutil.chown(path, self.os_user, self.os_user)
        self.data.chmod(0o700)
        self._as_server_user(self.bin / "initdb", "-D", self.data, "-E", "UTF8", "--no-locale",
                             "--auth-local=peer", "--auth-host=scram-sha-256")
        self._as_server_user("tee", "-a", self.data / "postgresql.conf", input=self._conf())
        self._as_server_user("tee", self.data / "pg_hba.conf", input=self._hba())
        prefix = ["runuser", "-u", self.os_user, "--"] if self.os_user else []
        self._open_path()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*prefix, str(self.bin / "postgres"), "-D", str(self.data)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self._wait_ready(timeout_s)
        # the role's password goes on stdin, not on a command line (which every local user sees)
        self._psql("postgres", f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}';\n"
                               f"CREATE DATABASE {self.database} OWNER {self.user};\n")

    def _wait_ready(self, timeout_s: float) -> None:
        """Polls pg_isready over TCP until the server accepts connections; fails at once if it exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-t", "2",
                                    "-d", "postgres"], capture_output=True, text=True)
            if ready.returncode == 0:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"postgres exited (rc {self.proc.returncode}) before it was ready:\n"
                                     + self.log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"postgres not ready on {self.host}:{self.port} after {timeout_s:.0f} s: "
                                     f"{ready.stdout.strip()}\n" + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)

    def _psql(self, database: str, sql: str) -> str:
        return self._as_server_user(self.bin / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.sockets,
                                    "-p", str(self.port), "-d", database, "-f", "-", input=sql).stdout

    def stop(self) -> None:
        """pg_ctl stop -m fast; should that fail, the same signal (SIGINT) to the server, and the failure raised."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self._as_server_user(self.bin / "pg_ctl", "stop", "-D", self.data, "-m", "fast", "-w", "-t", "60")
        except AssertionError:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGINT)
            raise
        finally:
            self.proc.wait(60)


def start_postgres(root: Path, base: Path) -> Postgres:
    """Starts the server in `root` (a new folder of the test); `base` is pytest's basetemp."""
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip(f"PostgreSQL is not installed (no {', '.join(BINARIES)} in /usr/lib/postgresql/*/bin or on "
                    f"PATH): apt-get install postgresql, as .ci/run does")
    os_user = None
    if os.geteuid() == 0:  # initdb and postgres refuse root
        try:
            os_user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            pytest.skip("running as root and there is no `postgres` OS user to run the server as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and there is no runuser to run the server as the postgres OS user")
    root.mkdir()
    if len(str(root / "sock")) + SOCKET_NAME_ROOM > UNIX_PATH_MAX:
        pytest.fail(f"the unix socket path under {root} would exceed {UNIX_PATH_MAX} bytes: use a shorter "
                    f"--basetemp")
    if os_user:
        shutil.chown(root, os_user, os_user)
    server = Postgres(binaries, root, free_port(), secrets.token_hex(16), os_user, base)
    assert re.fullmatch(r"[0-9a-f]+", server.password)  # safe in SQL quotes and in a URI as it is
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def postgres_for_test(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> Iterator[Postgres]:
    """A running server in tmp_path/pg for a fixture (see the module docstring), stopped on leaving. libpq's
    environment is cleared first (PGPASSWORD, PGHOST, ...; PGPASSFILE points at an empty file of the test), so that
    only what a test gives reaches the server."""
    for name in ("PGPASSWORD", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGSERVICEFILE"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "no-passwords"
    empty.write_text("")
    empty.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(empty))
    server = start_postgres(tmp_path / "pg", tmp_path_factory.getbasetemp())
    try:
        yield server
    finally:
        server.stop()
