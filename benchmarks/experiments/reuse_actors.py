"""Local experiment behind a proposed orchestration change: `reuse_actors=True` in the Tune config.

Every trial of a sweep now starts a fresh Ray worker process that imports torch, timm, mlflow and the project
before it trains: seconds per trial, paid again for every trial. Tune can keep the worker of a finished trial
for the next one with the same resources (`tune.TuneConfig(reuse_actors=True)`). This script runs the demo's
cached group-size sweep with the stock config and with that flag patched in (a wrapper process that patches
orchestration.tuning._tune_config, then calls orchestration.driver.run_sweep), interleaved:

    python benchmarks/experiments/reuse_actors.py [--rounds 1] [--keep-work] [extra overrides]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CHILD = "--child"


def child(argv: list[str]) -> int:
    """Runs one sweep in this process, with reuse_actors=True when `--reuse` is the first argument."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import orchestration.tuning as tuning
    from experiments.settings import compose_config
    from orchestration.driver import run_sweep

    if argv and argv[0] == "--reuse":
        argv = argv[1:]
        stock = tuning._tune_config
        tuning._tune_config = lambda plan, optuna_search: dataclasses.replace(stock(plan, optuna_search),
                                                                               reuse_actors=True)
    return run_sweep(compose_config(argv))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keep-work", action="store_true")
    parser.add_argument("--cache-dir", default=str(Path(__file__).resolve().parents[2] / "outputs" / "cache"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.context import DEMO_QUICK, PLANS, Context
    from benchmarks.sweeps import SweepRunner
    from benchmarks.timing import Stats

    work = Path(tempfile.mkdtemp(prefix="lpt-reuse-"))
    plan = dataclasses.replace(PLANS[(True, "cpu")], demo_overrides=(*DEMO_QUICK, *args.overrides), demo_rows=None)
    ctx = Context(quick=True, device=torch.device("cpu"), threads=1, out=work, work=work, plan=plan,
                  cache_dir=Path(args.cache_dir))
    runner = SweepRunner(ctx, "reuse")
    runner.prepare_backbone()
    script = str(Path(__file__).resolve())
    variants = {"stock": (script, CHILD), "reuse_actors": (script, CHILD, "--reuse")}
    runs: dict[str, list] = {name: [] for name in variants}
    for r in range(args.rounds):
        names = list(variants)[r % 2:] + list(variants)[:r % 2]
        for name in names:
            runs[name].append(runner.sweep(f"{name}-{r}", cache=True, rows=plan.demo_rows, entry=variants[name]))
    for name, sweeps in runs.items():
        gaps = []
        for s in sweeps:
            p2 = s.stage_times("phase2")
            gaps += [b[0] - a[1] for a, b in zip(p2, p2[1:])]
        print(f"{name:13s} sweep {Stats.of([s.wall_s for s in sweeps]).fmt()} s, "
              f"between phase-2 trials {Stats.of(gaps).fmt()} s")
    ratio = Stats.of([a.wall_s / b.wall_s for a, b in zip(runs["stock"], runs["reuse_actors"])])
    print(f"sweep wall stock / reuse_actors: {ratio.fmt()}")
    if args.keep_work:
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        sys.exit(child(sys.argv[2:]))
    main()
