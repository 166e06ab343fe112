"""GPU scheduling without a GPU: local Ray is told of one GPU (cluster.num_gpus=1) and the trials ask for a share of
it, as on a GPU cluster. resources.gpu=0.25 packs four phase-2 trials on the GPU at once, resources.gpu=1 runs them
one at a time, max_concurrent_trials caps the packing; a trial that gets the GPU but cannot use CUDA says so.

Concurrency is read from the trials' MLflow runs (created when a stage starts, ended when it finishes): intervals
that overlap ran at the same time. Where the test needs trials to overlap for sure, they hold after their first
phase-2 epoch (debug.hold_at_epoch) until the test has seen all of them there."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from benchmarks.gpu_check import most_at_once

from .conftest import REPO, mlflow_runs, run_sweep_cli, stage_runs

pytestmark = pytest.mark.slow

ROWS = ["5", "10", "20", "40"]
# CPUs for four trials on two cores; one row per trial (fuse=off), since these count the trials running at once
GPU = ["ablation=group_size", "cluster.num_gpus=1", "resources.cpu=0.5", "fuse=off"]


def rows(count: int) -> str:
    return f"ablation.values=[{','.join(ROWS[:count])}]"


def phase2_intervals(sweep_root, count: int) -> list[tuple[int, int]]:
    _, runs = mlflow_runs(sweep_root, "group_size-demo")
    phase2 = stage_runs(runs, "phase2")
    assert sorted(r.data.tags["lpt.row"] for r in phase2) == sorted(ROWS[:count])
    return [(r.info.start_time, r.info.end_time) for r in phase2]


def _held_sweep(overrides: list[str], events, log_path, held: int) -> str:
    """Runs the sweep with every phase-2 trial held after epoch 0; releases them once `held` trials are there."""
    with open(log_path, "w") as log:
        # Ray folds identical lines from several workers into one ("[repeated 3x across cluster]"): off, so that
        # each trial's own lines can be counted
        proc = subprocess.Popen([sys.executable, str(REPO / "orchestration" / "sweep.py"), *overrides], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
        try:
            deadline = time.monotonic() + 900
            while len(list(events.glob("phase2.*.epoch0"))) < held:
                assert proc.poll() is None, f"the sweep exited (rc {proc.returncode}) before {held} trials held"
                assert time.monotonic() < deadline, f"fewer than {held} trials held after 900 s"
                time.sleep(0.2)
            (events / "release").write_text("")
            assert proc.wait(timeout=900) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return log_path.read_text()


def test_quarter_gpu_packs_four_trials_and_says_they_train_on_the_cpu(sweep_overrides, tmp_path):
    events = tmp_path / "events"
    overrides = sweep_overrides(*GPU, rows(4), "resources.gpu=0.25", f"debug.event_dir={events}",
                                "debug.hold_at_epoch=0", "debug.fail_stage=phase2")
    # all four trials reach their held epoch 0 before any is released: four at once on one GPU
    output = _held_sweep(overrides, events, tmp_path / "sweep.log", held=len(ROWS))
    intervals = phase2_intervals(tmp_path / "sweeps", 4)
    assert most_at_once(intervals) == 4
    print(f"\npacked (gpu=0.25): {most_at_once(intervals)} at once, common window "
          f"{(min(e for _, e in intervals) - max(s for s, _ in intervals)) / 1000:.1f} s of "
          f"{(max(e for _, e in intervals) - min(s for s, _ in intervals)) / 1000:.1f} s")
    _, runs = mlflow_runs(tmp_path / "sweeps", "group_size-demo")
    assert {r.data.tags["lpt.device"] for r in stage_runs(runs, "phase2")} == \
        {"cpu (Ray assigned GPU 0; CUDA unavailable)"}
    # once per stage trained: the shared phase 1 and the four phase-2 trials
    assert output.count("WARNING: Ray assigned GPU 0 to this trial but torch cannot use CUDA") == 1 + len(ROWS)


def test_whole_gpu_runs_trials_one_at_a_time(sweep_overrides, tmp_path):
    result = run_sweep_cli(sweep_overrides(*GPU, rows(2), "resources.gpu=1"), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    intervals = sorted(phase2_intervals(tmp_path / "sweeps", 2))
    assert most_at_once(intervals) == 1
    print(f"\nwhole GPU (gpu=1): 1 at once; trials {', '.join(f'{(e - s) / 1000:.1f}' for s, e in intervals)} s, "
          f"second starts {(intervals[1][0] - intervals[0][1]) / 1000:.1f} s after the first ends")


def test_max_concurrent_trials_caps_the_packing(sweep_overrides, tmp_path):
    events = tmp_path / "events"
    overrides = sweep_overrides(*GPU, rows(3), "resources.gpu=0.25", "max_concurrent_trials=2",
                                f"debug.event_dir={events}", "debug.hold_at_epoch=0", "debug.fail_stage=phase2")
    # the first two trials hold together; the third can only start once one of them is released and done
    _held_sweep(overrides, events, tmp_path / "sweep.log", held=2)
    assert most_at_once(phase2_intervals(tmp_path / "sweeps", 3)) == 2
