"""Runs the real orchestration (`python orchestration/sweep.py ...`) and the plain loop as fresh processes, and
reads back what happened: wall time, timestamped driver output, and the stage store.

Each run gets its own sweep and stage folders under the scratch folder, so no run finds another's stages; all
runs share one data.cache_dir, so the demo's micro ViT is pretrained once, before any timing. Stage timings come
from the stage store: a stage folder's .lock is (re)opened when a trial takes the stage, its DONE marker is
written last, so for a stage trained once, DONE mtime - .lock mtime is its duration inside the trial.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.context import Context
from benchmarks.plain_loop import training

REPO = Path(__file__).resolve().parents[1]
ABLATION = "ablation=group_size"


@dataclass
class ProcessRun:
    wall_s: float
    returncode: int
    lines: list[tuple[float, str]]  # (seconds since launch, line) of stdout + stderr
    started_at: float  # time.time() at launch, to place file mtimes on the same clock

    def tail(self, n: int = 20) -> str:
        return "\n".join(text for _, text in self.lines[-n:])

    def first_line(self, prefix: str) -> float | None:
        return next((t for t, text in self.lines if text.startswith(prefix)), None)


@dataclass
class SweepRun(ProcessRun):
    stage_root: Path = field(default_factory=Path)
    overrides: list[str] = field(default_factory=list)

    def stage_folders(self, stage: str) -> list[Path]:
        return sorted(p for p in self.stage_root.glob(f"{stage}-*") if (p / "DONE").is_file())

    def trial_window(self, stage: str) -> float:
        """From the first stage of this kind taken to the last one done (seconds)."""
        folders = self.stage_folders(stage)
        return max((p / "DONE").stat().st_mtime for p in folders) - min((p / ".lock").stat().st_mtime for p in folders)

    def stage_times(self, stage: str) -> list[tuple[float | None, float]]:
        """(start, end) of each stage of this kind trained, seconds since launch, by end. The start is None for a
        stage whose .lock was reopened after it was done (a cached phase 1 that later trials looked up)."""
        times = []
        for p in self.stage_folders(stage):
            start, end = ((p / name).stat().st_mtime - self.started_at for name in (".lock", "DONE"))
            times.append((start if start <= end else None, end))
        return sorted(times, key=lambda t: t[1])

    def training(self, stage: str) -> dict[str, float]:
        """Seconds in training epochs and images trained by the stages of this kind (their result.json)."""
        total = {"train_s": 0.0, "images": 0}
        for p in self.stage_folders(stage):
            for key, value in training(json.loads((p / "result.json").read_text())["history"]).items():
                total[key] += value
        return total


def run_process(cmd: list[str], log_file: Path, timeout_s: float) -> ProcessRun:
    """Runs `cmd` in the repository root, timestamping each output line as it arrives (and writing it to
    `log_file`); killed once it has run `timeout_s` (checked as lines arrive: a sweep prints every 30 s)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    started_at, start = time.time(), time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc, open(log_file, "w") as log:
        for line in proc.stdout:
            now = time.perf_counter() - start
            lines.append((now, line.rstrip("\n")))
            log.write(f"{now:9.3f} {line}")
            if now > timeout_s:
                proc.kill()
                break
        returncode = proc.wait()
    return ProcessRun(time.perf_counter() - start, returncode, lines, started_at)


class SweepRunner:
    """Sweeps and plain loops of the demo's group-size ablation under `ctx.work/<label>/`."""

    def __init__(self, ctx: Context, label: str, timeout_s: float = 3600) -> None:
        self.ctx, self.timeout_s = ctx, timeout_s
        self.root = ctx.work / label
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(ctx.cache_dir).resolve()
        self._phase1_store: Path | None = None
        self._count = 0

    def common(self, rows: tuple[int, ...] | None = None) -> list[str]:
        """Overrides every run shares: the ablation (only `rows` of it, if given), the cache, the trial length."""
        values = [] if rows is None else [f"ablation.values=[{','.join(map(str, rows))}]"]
        return [ABLATION, *values, f"data.cache_dir={self.cache_dir}", *self.ctx.plan.demo_overrides]

    def prepare_backbone(self) -> float:
        """Pretrains (or finds) the demo's micro ViT in the shared cache; returns the seconds it took. A fresh
        process, like the sweeps: it resolves the backbone from the code and config on disk now, so it finds the
        very cache key the sweeps will look for."""
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.plain_loop", "--prepare-only", *self.common()]
        run = run_process(cmd, self.root / "pretrain.log", self.timeout_s)
        if run.returncode != 0:
            raise RuntimeError(f"demo pretraining failed:\n{run.tail()}")
        return time.perf_counter() - start

    def sweep(self, name: str, cache: bool, rows: tuple[int, ...] | None = None, extra: tuple[str, ...] = (),
              concurrent: int = 1, reuse_phase1: bool = False) -> SweepRun:
        """One sweep in a fresh process, `concurrent` trials at a time; `reuse_phase1` starts it with the phase 1
        of prime_phase1() already in its stage store."""
        self._count += 1
        folder = self.root / f"{self._count:02d}-{name}"
        stage_root = folder / "stages"
        if reuse_phase1:
            if self._phase1_store is None:
                raise RuntimeError("reuse_phase1 needs prime_phase1() first")
            stage_root.mkdir(parents=True)
            for stage in self._phase1_store.glob("phase1-*"):
                shutil.copytree(stage, stage_root / stage.name)
        overrides = [*self.common(rows), f"sweep.root={folder / 'sweeps'}", f"sweep.name={name}",
                     f"stages.root={stage_root}", f"stages.cache={str(cache).lower()}",
                     f"max_concurrent_trials={concurrent}", *extra]
        run = run_process([sys.executable, "orchestration/sweep.py", *overrides], folder.with_suffix(".log"),
                          self.timeout_s)
        if run.returncode != 0:
            raise RuntimeError(f"sweep {name} failed (exit {run.returncode}):\n{run.tail()}")
        return SweepRun(**vars(run), stage_root=stage_root, overrides=overrides)

    def prime_phase1(self, extra: tuple[str, ...] = ()) -> None:
        """Trains the shared phase 1 once (a one-row sweep), to be copied into later runs' stage folders."""
        run = self.sweep("prime", cache=True, rows=(5,), extra=extra)
        self._phase1_store = run.stage_root

    def plain_loop(self, rows: tuple[int, ...] | None = None) -> tuple[ProcessRun, dict[str, Any]]:
        self._count += 1
        folder = self.root / f"{self._count:02d}-loop"
        cmd = [sys.executable, "-m", "benchmarks.plain_loop", "--workdir", str(folder), *self.common(rows)]
        run = run_process(cmd, folder.with_suffix(".log"), self.timeout_s)
        if run.returncode != 0:
            raise RuntimeError(f"plain loop failed (exit {run.returncode}):\n{run.tail()}")
        return run, last_json(run)

    def fixed_costs(self) -> dict[str, float]:
        folder = self.root / "fixed_costs"
        run = run_process([sys.executable, "-m", "benchmarks.fixed_costs", "--workdir", str(folder)],
                          folder.with_suffix(".log"), self.timeout_s)
        if run.returncode != 0:
            raise RuntimeError(f"fixed-cost probe failed (exit {run.returncode}):\n{run.tail()}")
        return last_json(run)


def last_json(run: ProcessRun) -> dict[str, Any]:
    """The JSON object a helper process printed last (its other output is logging)."""
    for _, text in reversed(run.lines):
        if text.startswith("{"):
            return json.loads(text)
    raise RuntimeError(f"no JSON result in the output:\n{run.tail()}")
