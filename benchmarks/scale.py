"""Scale: an Optuna search of 1000 tiny demo trials on a simulated 3-node Ray cluster (ray.cluster_utils.Cluster:
a head without CPUs and two one-CPU worker nodes, so trials run two at a time on nodes other than the driver's),
with the real driver (`orchestration/sweep.py` in its own process), its tracking (through the sweep's own mlflow
server, as on any cluster of several nodes) and its report; then the same search killed after some hundreds of
trials and resumed; then 64 processes logging into one store through the single-writer design.

    python -m benchmarks.scale                      # 1000 trials, kill after 400, 64 writers x 600 s (about 40 min)
    python -m benchmarks.scale --trials 100 --kill-after 40 --writers 8 --writer-seconds 30 --out /tmp/scale

Writes <out>/scale.json and the "Scale" section of <out>/RESULTS.md (kept there by benchmarks/run.py).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.concurrent_writers import run_writers
from benchmarks.machine import describe, rss_mb
from benchmarks.section import with_section

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- scale: start -->", "<!-- scale: end -->"
WARM_UP_TRIALS = 200
# the demo at its smallest: a trial is one phase-2 epoch of two steps on ten classes (about half a second)
TINY = ["++data.options.num_classes=10", "++data.options.num_groups=5", "++data.options.n_max=40",
        "++data.options.tau=10", "++data.options.test_per_class=4", "++data.options.source_per_class=20",
        "++data.options.source_test_per_class=4", "backbone.model_kwargs.embed_dim=32",
        "backbone.model_kwargs.num_heads=2", "backbone.model_kwargs.depth=4", "pretrain.epochs=1",
        "pretrain.batch_size=64", "prompt.length=2", "data.eval_batch_size=64", "phase1.epochs=1",
        "phase1.warmup_epochs=0", "phase1.batch_size=8", "phase1.steps_per_epoch=2", "phase2.epochs=1",
        "phase2.warmup_epochs=0", "phase2.batch_size=8",
        "phase2.steps_per_epoch=2", "eval.every_epochs=1", "threads=1"]


class JournalCounter:
    """Finished trials of the Optuna journal, read incrementally (a driver's study is its sweep's journal)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.finished = path, 0, 0

    def count(self) -> int:
        if self.path.exists():
            with open(self.path, "rb") as journal:
                journal.seek(self.offset)
                chunk = journal.read()
            complete = chunk.rfind(b"\n") + 1
            self.offset += complete
            for line in chunk[:complete].splitlines():
                record = json.loads(line)
                self.finished += record.get("op_code") == 6 and record.get("state") in (1, 2, 3)
        return self.finished


def _driver(overrides: list[str], timings: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "benchmarks.scale_driver", str(timings), *overrides],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _watch(proc: subprocess.Popen, counter: JournalCounter, samples: list[tuple[float, int, float]],
           kill_after: int | None = None) -> bool:
    """Samples the driver's resident memory with the finished-trial count every half second until it exits (or
    until kill_after trials finished: then SIGKILLs it and everything it started). True if it was killed."""
    while proc.poll() is None:
        done, rss = counter.count(), rss_mb(proc.pid)
        if rss is None:
            break
        samples.append((time.monotonic(), done, rss))
        if kill_after is not None and done >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.5)
    proc.wait()
    return False


def _timings(path: Path) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        what, seconds = line.split()
        found.setdefault(what, []).append(float(seconds))
    return found


def _slope_kb_per_trial(samples: list[tuple[float, int, float]], trials: int) -> float | None:
    """Least-squares growth of the driver's memory per finished trial, after the warm-up and before the last
    trial (the report's own memory is counted apart)."""
    points = [(done, rss) for _, done, rss in samples if WARM_UP_TRIALS <= done < trials]
    if len({done for done, _ in points}) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return slope * 1024


def _tracked(sweeps: Path, sweep: str) -> dict[str, Any]:
    """What the store holds of the sweep, and how long the sweep's search_runs takes."""
    from orchestration.tracking.registry import RunRegistry

    runs = RunRegistry(f"sqlite:///{sweeps / 'mlflow.db'}", "demo")
    began = time.monotonic()
    found = runs.runs_of_sweep(sweep)
    search_s = time.monotonic() - began
    phase2 = [r for r in found if r.data.tags.get("lpt.stage") == "phase2"]
    keys = [r.data.tags["lpt.stage_key"] for r in phase2]
    durations = [(r.info.end_time - r.info.start_time) / 1000 for r in phase2 if r.info.end_time]
    return {"search_runs_s": round(search_s, 2), "runs": len(found), "phase2_runs": len(phase2),
            "distinct_phase2_keys": len(set(keys)),
            "finished": sum(r.info.status == "FINISHED" for r in phase2),
            "stage_seconds": durations,
            "window_s": (max(r.info.end_time for r in phase2) - min(r.info.start_time for r in phase2)) / 1000
            if phase2 else 0.0}


def _study(folder: Path, sweep: str) -> dict[str, Any]:
    from orchestration.tracking.study import load_sweep_study

    study = load_sweep_study(folder, sweep)
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for trial in trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    numbers = [t.number for t in trials]
    return {"trials": len(trials), "states": states, "distinct_numbers": len(set(numbers)),
            "distinct_params": len({tuple(sorted(t.params.items())) for t in trials if t.state.name == "COMPLETE"})}


def search(root: Path, cache: Path, address: str, trials: int, name: str, kill_after: int | None,
           log=print) -> dict[str, Any]:
    """One search of `trials` trials (killed after kill_after and resumed, when given); returns its measure."""
    sweeps = root / "sweeps"
    # each search its own stages.root: the sampler's seed is fixed, so another search's stages would all be reused
    overrides = [*TINY, f"data.cache_dir={cache}", f"sweep.root={sweeps}", f"stages.root={root / name / 'stages'}",
                 f"sweep.name={name}", "ablation=loss", "search=optuna", f"search.num_samples={trials}",
                 "search.max_concurrent=2", "cluster=ray", f"cluster.address={address}"]
    folder, timings, driver_log = sweeps / name, root / f"{name}.timings", root / f"{name}.log"
    counter = JournalCounter(folder / "optuna.journal")
    samples: list[tuple[float, int, float]] = []
    began = time.monotonic()
    killed_at = None
    if kill_after is not None:
        log(f"scale: {name}: {trials} trials, the driver killed after {kill_after}")
        if _watch(_driver(overrides, timings, driver_log), counter, samples, kill_after):
            killed_at = counter.count()
        log(f"scale: {name}: killed with {killed_at} trials finished; resuming")
        overrides.append("resume=true")
    else:
        log(f"scale: {name}: {trials} trials")
    proc = _driver(overrides, timings, driver_log)
    _watch(proc, counter, samples)
    wall = time.monotonic() - began
    tail = driver_log.read_text(errors="replace").splitlines()[-30:]
    if proc.returncode != 0:
        raise RuntimeError(f"the driver of {name} exited with {proc.returncode}:\n" + "\n".join(tail))
    measured = _timings(timings)
    tracked = _tracked(sweeps, name)
    stage_seconds = tracked.pop("stage_seconds")
    rss = [value for _, _, value in samples]
    last_trial_t = next((t for t, done, _ in samples if done >= trials), samples[-1][0])
    report_rss = max((value for t, _, value in samples if t >= last_trial_t), default=rss[-1])
    before_report = next((value for t, _, value in samples if t >= last_trial_t), rss[-1])
    return {
        "trials": trials, "killed_after": killed_at, "wall_s": round(wall, 1),
        "trial_window_s": round(tracked["window_s"], 1), "sum_stage_s": round(sum(stage_seconds), 1),
        "overhead_per_trial_s": round((tracked["window_s"] * 2 - sum(stage_seconds)) / trials, 3),
        "rss_mb": {"start": round(rss[0], 1), f"at_{WARM_UP_TRIALS}": round(next(
            (v for _, d, v in samples if d >= WARM_UP_TRIALS), rss[-1]), 1), "last_trial": round(before_report, 1),
            "peak_in_report": round(report_rss, 1)},
        "rss_kb_per_trial": None if kill_after is not None else _slope_kb_per_trial(samples, trials),
        "snapshot_s": round(sum(measured.get("snapshot", [])), 1), "snapshots": len(measured.get("snapshot", [])),
        "snapshot_share": round(sum(measured.get("snapshot", [])) / wall, 4),
        "report_s": round(sum(measured.get("report", [])), 1), "summary_s": round(sum(measured.get("summary", [])), 1),
        "tracked": tracked, "study": _study(folder, name),
        "report_lines": len((folder / "report" / "report.md").read_text().splitlines()),
        "report_files": sorted(p.name for p in (folder / "report").iterdir()),
    }


def _cluster(log=print):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    log(f"scale: 3-node cluster at {cluster.address}")
    return cluster


def markdown(found: dict[str, Any]) -> str:
    lines = [START, "## Scale (`python -m benchmarks.scale`)", "", f"Measured by `{found['command']}` on "
             f"{found['machine']['cpu']} ({found['machine']['logical_cpus']} cores), {found['date']}.", ""]
    for title, key in (("1000-trial Optuna search", "search"), ("The same, driver killed and resumed", "resumed")):
        if key not in found:
            continue
        s = found[key]
        t, st = s["tracked"], s["study"]
        lines += [f"### {title}", "",
                  "| measure | value | goal |", "|---|---|---|",
                  f"| trials | {s['trials']}" + (f" (driver SIGKILLed after {s['killed_after']}, resumed)"
                                                 if s["killed_after"] is not None else "") + " | |",
                  f"| wall (driver start to exit) | {s['wall_s']:.0f} s | |",
                  f"| trials' window x 2 slots vs sum of stage times | {s['trial_window_s'] * 2:.0f} s vs "
                  f"{s['sum_stage_s']:.0f} s: {s['overhead_per_trial_s']:.2f} s overhead per trial | |",
                  f"| driver RSS | {s['rss_mb']['start']:.0f} MB at start, {s['rss_mb'][f'at_{WARM_UP_TRIALS}']:.0f} "
                  f"at trial {WARM_UP_TRIALS}, {s['rss_mb']['last_trial']:.0f} at the last, "
                  f"{s['rss_mb']['peak_in_report']:.0f} peak in the report | |",
                  f"| driver RSS growth per trial after {WARM_UP_TRIALS} | "
                  + ("n/a (killed run)" if s["rss_kb_per_trial"] is None else f"{s['rss_kb_per_trial']:.1f} KB")
                  + " | <= 50 KB |",
                  f"| Tune experiment snapshots | {s['snapshot_s']:.1f} s in {s['snapshots']} calls: "
                  f"{100 * s['snapshot_share']:.2f} % of wall | <= 5 % |",
                  f"| report + parent-run summary | {s['report_s']:.1f} s + {s['summary_s']:.1f} s "
                  f"({s['report_lines']} lines of report.md; {', '.join(s['report_files'])}) | <= 60 s |",
                  f"| MLflow | {t['phase2_runs']} phase-2 runs, {t['distinct_phase2_keys']} distinct stage keys, "
                  f"{t['finished']} FINISHED; {t['runs']} runs of the sweep in all | each trial once |",
                  f"| search_runs of the sweep | {t['search_runs_s']:.2f} s | <= 5 s |",
                  f"| Optuna study (optuna.journal) | {st['trials']} trials {st['states']}, {st['distinct_numbers']} "
                  f"distinct numbers, {st['distinct_params']} distinct sampled points | each trial once |", ""]
    if "writers" in found:
        w = found["writers"]
        lines += ["### Concurrent writers", "",
                  f"{w['writers']} processes, each a stage run logging one epoch's {len(w) and 9} metrics every "
                  f"{w['interval_s']:g} s for {w['seconds']:.0f} s, into one SQLite store through the sweep's "
                  f"mlflow server (tracking.server=on):", "",
                  "| measure | value | goal |", "|---|---|---|",
                  f"| steps logged | {w['steps_logged']} ({w['steps_per_s']:g} per s) | |",
                  f"| metric rows in the file | {w['metric_rows']} of {w['expected_rows']} expected | |",
                  f"| lost / duplicated rows | {w['lost_rows']} / {w['duplicated_rows']} | 0 / 0 |",
                  f"| errors reaching a writer | {len(w['errors'])} ({w['locked_errors']} 'locked') | 0 |",
                  f"| log_epoch latency | median {w['latency_s']['median']} s, p95 {w['latency_s']['p95']} s, "
                  f"max {w['latency_s']['max']} s | |", ""]
    lines += [f"- {note}" for note in found.get("notes", [])]
    return "\n".join([*lines, END])


def keep_section(out: Path) -> None:
    """After benchmarks/run.py rewrote <out>/RESULTS.md: put the last scale measure back in."""
    found, results_md = out / "scale.json", out / "RESULTS.md"
    if found.is_file() and results_md.is_file():
        results_md.write_text(with_section(results_md.read_text(), markdown(json.loads(found.read_text())),
                                           START, END))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--kill-after", type=int, default=400, help="0: no killed-and-resumed search")
    parser.add_argument("--writers", type=int, default=64, help="0: no concurrent-writers measure")
    parser.add_argument("--writer-seconds", type=float, default=600)
    parser.add_argument("--writer-interval", type=float, default=5.0,
                        help="seconds between a writer's steps (a real trial's epochs are minutes apart)")
    parser.add_argument("--only", default="search,resumed,writers")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    found: dict[str, Any] = {"command": "python -m benchmarks.scale " + " ".join(argv or sys.argv[1:]),
                             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": describe(1)}
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    with tempfile.TemporaryDirectory(prefix="lpt-scale-") as scratch:
        root = Path(scratch)
        if parts & {"search", "resumed"}:
            cluster = _cluster()
            try:
                if "search" in parts:
                    found["search"] = search(root, root / "cache", cluster.address, args.trials, "scale", None)
                    print(json.dumps(found["search"], indent=1), flush=True)
                if "resumed" in parts and args.kill_after:
                    found["resumed"] = search(root, root / "cache", cluster.address, args.trials, "scale-killed",
                                              args.kill_after)
                    print(json.dumps(found["resumed"], indent=1), flush=True)
            finally:
                cluster.shutdown()
        if "writers" in parts and args.writers:
            (root / "writers").mkdir()
            found["writers"] = run_writers(args.writers, args.writer_seconds, root / "writers",
                                           args.writer_interval)
            print(json.dumps(found["writers"], indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(found, indent=1))
    results_md = args.out / "RESULTS.md"
    results_md.write_text(with_section(results_md.read_text() if results_md.exists() else "", markdown(found),
                                       START, END))
    print(f"scale: {args.out / 'scale.json'}, section Scale of {results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
