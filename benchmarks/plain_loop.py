"""The plain way to run an ablation's trials: one process, a for-loop over run_stage, no Ray, no MLflow.

    python -m benchmarks.plain_loop --workdir DIR <hydra overrides, as for orchestration/sweep.py>
    python -m benchmarks.plain_loop --prepare-only <overrides>   # only pretrain (or find) the demo backbone

Runs what a cached sweep of the same overrides runs: the (single, shared) phase 1 once, then phase 2 of every
row of the ablation on top of it, one after the other. Prints one JSON line with the wall seconds of each stage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

START = time.perf_counter()

import torch

from experiments.ablations import RUN_UNTIL, get_ablation
from experiments.compose import compose_config, split
from experiments.pretrain_demo import resolve_backbone
from lpt_core.train import StageHooks, run_stage


class QuietHooks(StageHooks):
    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def training(history: list[dict[str, float]]) -> dict[str, float]:
    """Seconds spent in training epochs and images trained, from a stage's per-epoch history."""
    return {"train_s": sum(h["epoch_time_s"] for h in history),
            "images": sum(round(h["train_images_per_s"] * h["epoch_time_s"]) for h in history)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir")
    parser.add_argument("--prepare-only", action="store_true", help="resolve the demo backbone and exit")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if not (args.workdir or args.prepare_only):
        parser.error("--workdir is required")
    imported = time.perf_counter() - START
    spec = split(compose_config(args.overrides))
    ablation = get_ablation(spec.settings.ablation.name)
    wanted = spec.settings.ablation.values  # ablation.values: the rows a sweep would keep
    points = [p for p in ablation.points_for(spec.name) if wanted is None or p.label in map(str, wanted)]
    hooks, stages = QuietHooks(), []
    if spec.lpt.threads:  # the demo pins one thread; pretraining, if needed, runs with it as well
        torch.set_num_threads(spec.lpt.threads)
    base = resolve_backbone(spec.lpt, spec.pretrain, log=hooks.log)  # the sweep's driver does the same
    if args.prepare_only:
        return
    workdir = Path(args.workdir)
    phase1_ckpt = None
    for i, point in enumerate(points):
        cfg = base.with_overrides({k: v for k, v in point.overrides.items() if k != RUN_UNTIL})
        if phase1_ckpt is None:  # the rows differ in phase-2 fields only: one phase 1 serves them all
            start = time.perf_counter()
            result = run_stage(cfg, "phase1", workdir / "phase1", hooks)
            stages.append({"stage": "phase1", "wall_s": time.perf_counter() - start, **training(result.history)})
            phase1_ckpt = result.checkpoint_dir
        start = time.perf_counter()
        result = run_stage(cfg, "phase2", workdir / f"phase2-{i}", hooks, init_from=phase1_ckpt)
        stages.append({"stage": "phase2", "row": point.label, "wall_s": time.perf_counter() - start,
                       **training(result.history)})
    print(json.dumps({"import_s": imported, "stages": stages, "total_s": time.perf_counter() - START}), flush=True)


if __name__ == "__main__":
    main()
