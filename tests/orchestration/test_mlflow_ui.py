"""The MLflow UI as a user opens it after two sweeps: the `mlflow ui` command the sweep printed, serving the one
store of both, and the link it printed, loaded in headless Chromium (Debian's package; .ci/run installs it). What
the rendered pages show is read back from their DOM; the screenshots stay in the test's folder (landing.png,
parent.png, artifacts.png) for a person to look at."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import pytest

from experiments.compose import compose_config
from orchestration.execute.driver import run_sweep
from orchestration.tracking.single_writer import server_environment

from .conftest import ONE_SLOT, mlflow_runs, stage_runs, tiny_sweep

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH: the browser check needs Debian's "
                                                          "chromium package (.ci/run installs it)")]
WINDOW = "2000,1100"  # wide enough that no column of the runs table is scrolled out of the DOM


@dataclass
class Workbench:
    root: Path
    link: str  # as printed, its port replaced by the test server's
    base: str  # http://127.0.0.1:<port>


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _printed(lines: list[str]) -> tuple[list[str], str]:
    """The `mlflow ui` command and the link of the last sweep's closing lines."""
    text = "\n".join(lines)
    command = re.findall(r"^\s*(mlflow ui --backend-store-uri \S+ --host 127\.0\.0\.1 --port 5000)$", text, re.M)
    link = re.findall(r"(http://127\.0\.0\.1:5000/#/experiments/\S+)", text)
    assert command and link, text[-2000:]
    return shlex.split(command[-1]), link[-1]


def _wait_until_served(base: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):  # refused or reset: the server is still starting
            with urllib.request.urlopen(f"{base}/health", timeout=5) as answer:
                if answer.read() == b"OK":
                    return
        if server.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"mlflow ui did not answer on {base} (exit code {server.poll()}):\n"
                                 f"{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def workbench(tmp_path_factory: pytest.TempPathFactory, demo_cache: Path, ray_session) -> Iterator[Workbench]:
    """group_size (rows 5 and 20) and topk (row 1) on one stage store and the default tracking store, served by
    the printed command on a free port."""
    root = tmp_path_factory.mktemp("workbench")
    printed: list[str] = []
    for extra in (["ablation=group_size", "ablation.values=[5,20]"], ["ablation=topk", "ablation.values=[1]"]):
        assert run_sweep(compose_config(tiny_sweep(root, demo_cache, ONE_SLOT, *extra)), log=printed.append) == 0
    command, link = _printed(printed)
    port = _free_port()
    log = root / "mlflow-ui.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", *command[1:-1], str(port)], cwd=root,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env=server_environment(command[command.index("--backend-store-uri") + 1]))
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_served(base, server, log)
        yield Workbench(root, link.replace("127.0.0.1:5000/", f"127.0.0.1:{port}/"), base)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: their own process group
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


class _GridCells(HTMLParser):
    """The runs table's cells from the rendered DOM: row index -> column id -> text. AG Grid splits a row into
    containers (pinned left, centre), each an element with the row's row-index; a cell carries its col-id."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str | None, str | None]] = []
        self.rows: dict[int, dict[str, str]] = {}

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.VOID:
            return
        a = dict(attrs)
        row, col = self.stack[-1] if self.stack else (None, None)
        cell = a.get("col-id") if a.get("role") == "gridcell" else None
        self.stack.append((a.get("row-index", row), cell or col))

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID and self.stack:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and None not in self.stack[-1] and data.strip():
            row, col = self.stack[-1]
            cells = self.rows.setdefault(int(row), {})
            cells[col] = f"{cells.get(col, '')} {data.strip()}".strip()

    @classmethod
    def read(cls, html: str) -> list[dict[str, str]]:
        parser = cls()
        parser.feed(html)
        return [parser.rows[i] for i in sorted(parser.rows)]


def _render(workbench: Workbench, url: str, name: str) -> str:
    """The page after its scripts ran (Chromium's virtual time: no fixed sleep), its screenshot saved as
    <name>.png; a fresh browser profile each time, as a first visit."""
    folder = workbench.root / "chromium"
    env = {**os.environ, "XDG_CONFIG_HOME": str(folder / "config"), "XDG_CACHE_HOME": str(folder / "cache")}
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                           f"--window-size={WINDOW}", f"--user-data-dir={folder / name}",
                           f"--screenshot={workbench.root / f'{name}.png'}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0 and (workbench.root / f"{name}.png").stat().st_size > 0, done.stderr[-2000:]
    return done.stdout


def _shown(value: float) -> str:
    """A metric as the runs table holds it: the whole number, as JavaScript writes it (the shortest decimal that
    reads back as the same double, like Python's repr; no `.0` on whole numbers). The cell cuts it visually."""
    return repr(value).removesuffix(".0")


def _column(name: str) -> str:
    return f"metrics.`{name}`"


def test_the_printed_link_opens_the_runs_of_both_sweeps_grouped_with_their_key_metrics(workbench: Workbench):
    html = _render(workbench, workbench.link, "landing")
    assert ">Model registry<" in html and ">Judges<" not in html  # the "Model training" side bar, not GenAI's
    assert "Group by: lpt.sweep<" in html and "viewing a shared view" in html  # the view the sweeps stored
    rows = _GridCells.read(html)
    names = [re.sub(r"^#[0-9a-f]{6} ", "", row.get("attributes.`Run Name`", "")) for row in rows]
    group_size = ["group_size-demo", "phase1 (shared by m=5,20) seed=0"]
    assert names[:3] == ["Group: group_size-demo 4", *group_size] and sorted(names[3:5]) == [
        "phase2 m=20 seed=0", "phase2 m=5 seed=0"]  # the two phase-2 trials ran at once: either starts first
    assert names[5:] == ["Group: topk-demo 2", "topk-demo", "phase2 k=1 seed=0"]
    key_columns = [_column(n) for n in ("acc", "authors/few", "standard/few", "acc/m:5", "acc/m:20", "acc/k:1")]
    assert all(set(key_columns) <= set(row) for row in rows)

    _, runs = mlflow_runs(workbench.root / "sweeps", "group_size-demo")
    _, topk_runs = mlflow_runs(workbench.root / "sweeps", "topk-demo")
    by_name = {run.info.run_name: run for run in runs + topk_runs}
    for row, name in zip(rows, names):
        if name.startswith("Group: "):
            continue
        metrics = by_name[name].data.metrics
        for column in key_columns:
            value = metrics.get(column.removeprefix("metrics.`").removesuffix("`"))
            assert row[column] == ("-" if value is None else _shown(value)), (name, column)
    parent = by_name["group_size-demo"]
    assert parent.data.metrics["acc/m:20"] == by_name["phase2 m=20 seed=0"].data.metrics["acc"]  # one seed
    stages = stage_runs(runs, "phase1") + stage_runs(runs, "phase2")  # nested under the parent, as in its page
    assert len(stages) == 3 and {r.data.tags["mlflow.parentRunId"] for r in stages} == {parent.info.run_id}


def test_the_parent_run_summarises_its_sweep_and_lists_its_stage_runs(workbench: Workbench):
    _, runs = mlflow_runs(workbench.root / "sweeps", "group_size-demo")
    (parent,) = [r for r in runs if r.data.tags.get("lpt.role") == "sweep"]
    route = workbench.link.split("/runs?")[0] + f"/runs/{parent.info.run_id}"
    html = _render(workbench, f"{route}?workflowType=machine_learning", "parent")
    child_runs = re.search(r">Child runs<(.*?)>Source<", html, re.S)
    assert child_runs is not None
    listed = re.findall(r'<a href="#/experiments/\d+/runs/(\w+)">([^<]+)</a>', child_runs.group(1))
    stages = stage_runs(runs, "phase1") + stage_runs(runs, "phase2")
    assert sorted(listed) == sorted((r.info.run_id, r.info.run_name) for r in stages)
    assert "group_size-demo: ablation" in html and "paired differences to the reference row m = 20" in html
    for key, value in {"ablation": "group_size", "rows": "5,20", "reference": "m=20", "seeds": "0"}.items():
        assert parent.data.params[key] == value and f">{key}<" in html and f">{value}<" in html

    listing = json.loads(urllib.request.urlopen(
        f"{workbench.base}/ajax-api/2.0/mlflow/artifacts/list?run_id={parent.info.run_id}&path=report").read())
    assert {f["path"] for f in listing["files"]} >= {"report/report.md", "report/report.csv", "report/axis.png",
                                                     "report/compare.png", "report/matches.png"}
    artifacts = _render(workbench, f"{route}/artifacts/report/axis.png?workflowType=machine_learning", "artifacts")
    assert "axis.png" in artifacts and 'src="blob:' in artifacts  # the plot, fetched from the store's artifacts
