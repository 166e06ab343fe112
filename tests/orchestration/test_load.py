"""Load: 100 tiny Optuna trials on one machine. Every trial lands in MLflow exactly once, the report has 100 rows,
and the driver's memory stays flat (its RSS is sampled while the sweep runs). The same sweep is the loss ablation's
Optuna search end to end: its report lists the best trials first with the importances of the sweep's own study,
each sampled trial is a phase-2 run of its own with distinct values inside the search space."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time

import pytest

from benchmarks.machine import rss_mb
from experiments.ablations import get_ablation
from orchestration.reporting.build import MAX_OPTUNA_ROWS
from orchestration.reporting.optuna_study import importances as importance_scores
from orchestration.tracking.study import load_sweep_study

from .conftest import REPO, mlflow_runs, stage_runs
from .report_checks import check_numbers_and_intervals, read_report

pytestmark = pytest.mark.slow
TRIALS = 100


def test_hundred_trials_each_tracked_once_with_flat_driver_memory(sweep_overrides, tmp_path):
    overrides = sweep_overrides("ablation=loss", "search=optuna", f"search.num_samples={TRIALS}",
                                "search.max_concurrent=2", "phase2.epochs=1", "phase2.warmup_epochs=0",
                                "eval.feature_stats=false")
    stages = tmp_path / "stages"
    samples: list[tuple[int, float]] = []  # (phase-2 stages finished so far, driver RSS in MB)
    proc = subprocess.Popen([sys.executable, str(REPO / "orchestration" / "sweep.py"), *overrides], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout))
    reader.start()
    while proc.poll() is None:
        rss = rss_mb(proc.pid)
        if rss is not None:
            samples.append((len(list(stages.glob("phase2-*/DONE"))), rss))
        time.sleep(1)
    reader.join()
    assert proc.returncode == 0, "".join(output[-200:])

    client, runs = mlflow_runs(tmp_path / "sweeps", "loss-demo")
    phase2 = stage_runs(runs, "phase2")
    assert len(phase2) == TRIALS and len({r.data.tags["lpt.stage_key"] for r in phase2}) == TRIALS
    assert len(stage_runs(runs, "phase1")) == 1
    records = json.loads((tmp_path / "sweeps" / "loss-demo" / "trials.json").read_text())
    assert len(records) == TRIALS
    report = (tmp_path / "sweeps" / "loss-demo" / "report" / "report.md").read_text()
    assert report.count("| phase2 |") == 2 * MAX_OPTUNA_ROWS  # report.md lists the best trials ...
    with open(tmp_path / "sweeps" / "loss-demo" / "report" / "report.csv") as handle:
        assert sum(row["role"] == "row" for row in csv.DictReader(handle)) == TRIALS  # ... report.csv all of them

    early = [rss for done, rss in samples if 10 <= done <= 30]
    late = [rss for done, rss in samples if done >= TRIALS - 10]
    peak = max(rss for _, rss in samples)
    print(f"driver RSS: {min(early):.0f}-{max(early):.0f} MB after 10-30 trials, {max(late):.0f} MB at the end, "
          f"peak {peak:.0f} MB")
    assert max(late) < 1.25 * max(early) + 50  # flat: no per-trial growth worth the name

    # the loss ablation's search end to end: the report, best first, with the study's importances
    folder = tmp_path / "sweeps" / "loss-demo"
    markdown, rows = read_report(folder)
    trials = [r for r in rows if r["role"] == "row"]
    assert len(trials) == TRIALS and [r["role"] for r in rows].count("upstream") == 1
    accs = [float(r["acc"]) for r in trials]
    assert accs == sorted(accs, reverse=True)  # best first
    check_numbers_and_intervals(folder, rows)
    importances = markdown.split("### parameter importances")[1]
    space = get_ablation("loss").space
    for key in space:
        assert f"| {key} |" in importances
    assert "Optuna trials have no reference row" in markdown
    assert (folder / "report" / "optuna.png").exists()
    # the importances are those of the sweep's own study, which optuna.load_study opens from the sweep folder
    study = load_sweep_study(folder, "loss-demo")
    assert f"on the sweep's study (optuna.journal in its folder, {TRIALS} complete trials)" in importances
    for key, value in importance_scores(study).items():
        assert f"| {key} | {value:.3f} |" in importances
    # each sampled trial is its own phase-2 run on the one phase 1, with distinct values inside the space
    sampled = {tuple(float(r.data.params[key]) for key in sorted(space)) for r in phase2}
    assert len(sampled) == TRIALS
    for values in sampled:
        for key, value in zip(sorted(space), values):
            assert space[key].low <= value <= space[key].high, (key, value)
    assert all(set(r["config"]) == set(space) for r in records)
