"""Many processes logging per-step metrics into one SQLite store through the single-writer design
(orchestration/tracking/single_writer.py): one `mlflow server` over the file, every writer a client of it, as the
trials of a multi-node sweep are. Afterwards the file itself is read: every step a writer logged must be there
exactly once, and no error may have reached a writer.

    python -m benchmarks.concurrent_writers --writers 64 --seconds 600 --out benchmarks/writers.json

A writer is what a trial does per epoch: RunRegistry.stage_run, then MetricSpool.log_epoch for step 0, 1, ...
(eight metrics per step, as a phase-2 epoch logs) every --interval seconds until its time is up.
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

METRICS = ("loss", "lr", "acc", "acc_many", "acc_medium", "acc_few", "epoch_time_s", "train_images_per_s")


def _writer(uri: str, index: int, seconds: float, interval_s: float, start_at: float, out: str) -> None:
    """One trial-like writer; its outcome (steps sent, latencies, the error that reached it) goes to `out`."""
    from orchestration.tracking.registry import MetricSpool, RunRegistry

    outcome: dict[str, Any] = {"writer": index, "steps": 0, "latencies_s": [], "error": None}
    try:
        runs = RunRegistry(uri, "writers")
        parent = runs.parent_run("writers", {})
        run = runs.stage_run(parent, "writers", f"key-{index}", f"writer-{index}", {"writer": index}, {})
        outcome["run_id"] = run
        spool = MetricSpool(runs.client)
        time.sleep(max(0.0, start_at - time.time()))  # every writer starts logging at once
        deadline, step = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            began = time.monotonic()
            values = {name: float(step * 10 + i) for i, name in enumerate(METRICS)}
            if not spool.log_epoch(run, step, values) and spool.unlogged():
                spool.flush(timeout_s=120)
            outcome["latencies_s"].append(time.monotonic() - began)
            step += 1
            time.sleep(max(0.0, interval_s - (time.monotonic() - began)))
        if not spool.flush(timeout_s=120):
            raise RuntimeError(f"{len(spool.unlogged())} batch(es) still unsent after 120 s")
        outcome["steps"] = step
    except Exception as err:  # what reached the trial: the measure counts it
        outcome["error"] = f"{type(err).__name__}: {err}"[:2000]
    Path(out).write_text(json.dumps(outcome))


def _store_rows(db: Path) -> dict[str, list[tuple[str, int]]]:
    """run id -> its (metric, step) rows as the file holds them (duplicates included)."""
    found: dict[str, list[tuple[str, int]]] = {}
    with sqlite3.connect(db) as connection:
        for run_id, key, step in connection.execute("select run_uuid, key, step from metrics"):
            found.setdefault(run_id, []).append((key, step))
    return found


def run_writers(writers: int, seconds: float, folder: Path, interval_s: float = 1.0,
                log=print) -> dict[str, Any]:
    """Starts the server over folder/mlflow.db, runs the writers, checks the file. Returns the measure."""
    from orchestration.tracking.single_writer import single_writer

    importlib.import_module("orchestration.tracking.registry")  # once, here, before the writers fork

    db = folder / "mlflow.db"
    with single_writer(f"sqlite:///{db}", "on", 0, 1, folder / "mlartifacts", folder, "writers", log) as uri:
        # forked from this process, which has MLflow's client imported: the writers share its pages (64 spawned
        # interpreters would each hold their own ~160 MB of imports)
        context = multiprocessing.get_context("fork")
        start_at = time.time() + 10 + writers * 0.3  # after every writer imported MLflow and made its run
        procs = [context.Process(target=_writer, args=(uri, i, seconds, interval_s, start_at,
                                                       str(folder / f"writer-{i}.json")))
                 for i in range(writers)]
        began = time.monotonic()
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        wall = time.monotonic() - began
    outcomes = [json.loads((folder / f"writer-{i}.json").read_text()) if (folder / f"writer-{i}.json").exists()
                else {"writer": i, "steps": 0, "latencies_s": [], "error": "the writer process died"}
                for i in range(writers)]
    rows = _store_rows(db)
    lost = duplicated = 0
    for outcome in outcomes:
        held = rows.get(outcome.get("run_id", ""), [])
        expected = {(name, step) for step in range(outcome["steps"]) for name in (*METRICS, "epoch")}
        lost += len(expected - set(held))
        duplicated += len(held) - len(set(held))
    latencies = sorted(x for o in outcomes for x in o["latencies_s"])
    steps = sum(o["steps"] for o in outcomes)
    return {
        "writers": writers, "seconds": seconds, "interval_s": interval_s, "wall_s": round(wall, 1),
        "steps_logged": steps, "metric_rows": sum(len(v) for v in rows.values()),
        "expected_rows": steps * (len(METRICS) + 1), "lost_rows": lost, "duplicated_rows": duplicated,
        "errors": [o["error"] for o in outcomes if o["error"]],
        "locked_errors": sum("locked" in (o["error"] or "").lower() for o in outcomes),
        "steps_per_s": round(steps / seconds, 1),
        "latency_s": {"median": round(statistics.median(latencies), 4) if latencies else None,
                      "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 4) if latencies else None,
                      "max": round(latencies[-1], 4) if latencies else None},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between a writer's steps")
    parser.add_argument("--out", type=Path, default=None, help="the measure as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lpt-writers-") as scratch:
        found = run_writers(args.writers, args.seconds, Path(scratch), args.interval)
    print(json.dumps(found, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(found, indent=1))
    return 0 if not found["errors"] and not found["lost_rows"] and not found["duplicated_rows"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
