"""Measure 7: fused phase-2 rows (lpt_core.fused) against the same rows trained one after the other.

(a) The step: one fused step of R rows (`fused_train_step`: the shared pass once, R group passes) against R
    unfused steps (`lpt_core.step.train_step`), interleaved, for R = 1, 2, 4, 8 and each model shape; random
    weights, random batches already on the device, m = 5, 10, 20, 40, 5, ... for the rows.
(b) The phase 2 of a group_size sweep on the demo (m = 5, 10, 20, 40, and its first two rows): `run_stage` of
    every row one after the other against one `run_fused_stage` of all of them, from one phase-1 checkpoint,
    interleaved rounds in this process; then each variant once in a fresh process for the memory one trial takes.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import threading
import time
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file

from benchmarks.context import Context
from benchmarks.steps import NUM_CLASSES, class_counts, lpt_step, random_batch, shape_of
from benchmarks.timing import Stats, interleaved
from lpt_core.config import LPTConfig, PromptConfig, StageConfig
from lpt_core.fused import FusedRow, fused_train_step, run_fused_stage
from lpt_core.model import LPTModel
from lpt_core.schedule import build_optimizer
from lpt_core.step import StepLoss
from lpt_core.train import StageHooks, run_stage

TITLE = "7. Fused phase-2 rows"
ROWS = (1, 2, 4, 8)
POOL_SIZES = (5, 10, 20, 40)
GOALS = {4: 0.70, 2: 0.85}  # phase-2 wall, fused / unfused, on CPU
GPU_GOAL = 2.0  # sweep throughput, fused / unfused, bf16 on a GPU


class _Quiet(StageHooks):
    def log(self, message: str) -> None:
        return None


def _rows_of(shape: str, count: int, device: torch.device) -> list[LPTModel]:
    """`count` phase-2 models around one random-weight backbone and one shared prompt, pools of 5, 10, 20, 40, ..."""
    spec = shape_of(shape)
    torch.manual_seed(0)
    backbone = timm.create_model(spec.model, pretrained=False, num_classes=0, **spec.kwargs).eval()
    models = [LPTModel(backbone, NUM_CLASSES, PromptConfig(length=spec.prompt_length,
                                                           pool_size=POOL_SIZES[i % len(POOL_SIZES)])).to(device)
              for i in range(count)]
    for model in models[1:]:  # one phase 1 under all rows
        model.shared_prompt.load_state_dict(models[0].shared_prompt.state_dict())
    return models


def _step_ratios(ctx: Context, shape: str) -> list[dict[str, Any]]:
    per_branch = ctx.plan.throughput[shape]
    batch = random_batch(shape, per_branch, ctx.device)
    rows = []
    for count in ROWS:
        models = _rows_of(shape, count, ctx.device)
        alone = [lpt_step(m, "phase2", ctx.device, ctx.precision) for m in models]  # the same recipe as fused:
        losses = [StepLoss.for_epoch(StageConfig(), class_counts(), epoch=0) for _ in models]
        optimizers = [build_optimizer(m.set_trainable("phase2"), StageConfig()) for m in models]

        def fused() -> None:
            fused_train_step(models, batch.images, batch.labels, losses, optimizers, ctx.precision)

        def unfused() -> None:
            for step in alone:
                step(batch)

        secs = interleaved({"unfused": unfused, "fused": fused}, ctx.plan.repeats, ctx.plan.warmup, ctx.sync)
        ratios = [f / u for f, u in zip(secs["fused"], secs["unfused"])]
        rows.append({"shape": shape, "rows": count, "batch": f"{per_branch}+{per_branch}",
                     "fused_step_s": Stats.of(secs["fused"]).as_dict(),
                     "unfused_steps_s": Stats.of(secs["unfused"]).as_dict(), "ratio": Stats.of(ratios).as_dict()})
        ctx.stamp(f"fused {shape} R={count}: {Stats.of(ratios).fmt()} of R separate steps")
    return rows


def _demo_configs(ctx: Context, count: int) -> list[LPTConfig]:
    from experiments.compose import compose_config, split

    overrides = [f"data.cache_dir={ctx.cache_dir}", f"threads={ctx.threads}", f"device={ctx.device.type}",
                 *ctx.plan.demo_overrides]
    base = split(compose_config(overrides)).lpt
    weights = ctx.work / "fused_micro_vit.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        save_file(timm.create_model(base.backbone.name, pretrained=False, num_classes=0,
                                    **base.backbone.model_kwargs).state_dict(), str(weights))
    base = dataclasses.replace(base, backbone=dataclasses.replace(base.backbone, weights_file=str(weights)))
    return [base.with_overrides({"prompt.pool_size": m}) for m in POOL_SIZES[:count]]


def _phase2(configs: list[LPTConfig], phase1: Path, work: Path, fused: bool) -> float:
    start = time.perf_counter()
    if fused:
        run_fused_stage([FusedRow(cfg, work / f"row{i}", _Quiet(), init_from=phase1) for i, cfg in enumerate(configs)])
    else:
        for i, cfg in enumerate(configs):
            run_stage(cfg, "phase2", work / f"row{i}", _Quiet(), init_from=phase1)
    return time.perf_counter() - start


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def _peak_child(configs: list[LPTConfig], phase1: Path, work: Path, fused: bool, threads: int, queue) -> None:
    """Peak resident memory while the phase 2 runs, sampled every 5 ms, above what the process held before it
    (interpreter, torch, the configs): the dataset, the backbone, the rows' models and activations."""
    torch.set_num_threads(threads)
    before, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # unfused, each row is its own trial and process: the largest pool (the last row) is a trial's peak
    _phase2(configs if fused else configs[-1:], phase1, work, fused=fused)
    done.set()
    sampler.join()
    queue.put(max(peak[0], _rss_mib()) - before)


def _peak_mib(configs: list[LPTConfig], phase1: Path, work: Path, fused: bool, threads: int) -> float:
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=_peak_child, args=(configs, phase1, work, fused, threads, queue))
    child.start()
    peak = queue.get(timeout=3600)
    child.join()
    return peak


def _sweep_walls(ctx: Context) -> list[dict[str, Any]]:
    configs = _demo_configs(ctx, len(POOL_SIZES))
    phase1 = run_stage(configs[0], "phase1", ctx.work / "fused_phase1", _Quiet()).checkpoint_dir
    rows = []
    for count in (2, len(POOL_SIZES)):
        subset = configs[:count]
        walls: dict[str, list[float]] = {"unfused": [], "fused": []}
        for round_ in range(max(2, ctx.plan.sweep_rounds + 1)):
            for variant in ("unfused", "fused"):
                work = ctx.work / f"fused_r{count}_{variant}_{round_}"
                walls[variant].append(_phase2(subset, phase1, work, fused=variant == "fused"))
        ratios = [f / u for f, u in zip(walls["fused"], walls["unfused"])]
        peaks = {v: _peak_mib(subset, phase1, ctx.work / f"fused_peak_{count}_{v}", v == "fused", ctx.threads)
                 for v in ("unfused", "fused")}
        rows.append({"rows": count, "pool_sizes": list(POOL_SIZES[:count]),
                     "unfused_s": Stats.of(walls["unfused"]).as_dict(), "fused_s": Stats.of(walls["fused"]).as_dict(),
                     "ratio": Stats.of(ratios).as_dict(), "peak_mib": peaks, "goal": GOALS.get(count)})
        ctx.stamp(f"fused demo phase 2, {count} rows: {Stats.of(ratios).fmt()} of unfused")
    return rows


def run(ctx: Context) -> dict[str, Any]:
    shapes = [s for s in ("micro", "vit_s") if s in ctx.plan.throughput]
    steps = [row for shape in shapes for row in _step_ratios(ctx, shape)]
    sweeps = _sweep_walls(ctx) if ctx.device.type == "cpu" else []
    return {"title": TITLE, "device": str(ctx.device), "precision": ctx.precision, "threads": ctx.threads,
            "steps": steps, "sweeps": sweeps, "demo_overrides": list(ctx.plan.demo_overrides)}


def markdown(section: dict[str, Any]) -> str:
    lines = [f"Device {section['device']}, {section['precision']}, {section['threads']} torch thread(s). Step: one "
             "fused step of R rows against R unfused steps, interleaved (random weights and batches; full dual "
             "step). Ratio < 1: fused is cheaper.", "",
             "| model | batch (cb+ib) | R | fused step s | R unfused steps s | fused / unfused |",
             "|---|---|---|---|---|---|"]
    for r in section["steps"]:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['rows']} | {Stats(**r['fused_step_s']).fmt()} | "
                     f"{Stats(**r['unfused_steps_s']).fmt()} | {Stats(**r['ratio']).fmt()} |")
    if section["sweeps"]:
        lines += ["", f"Demo phase 2 of a group_size sweep ({' '.join(section['demo_overrides'])}): every row's "
                  "run_stage one after the other vs one run_fused_stage, from one phase-1 checkpoint, interleaved. "
                  "Memory of one trial: its process's peak resident memory while the phase 2 runs, above what it "
                  "held before (the dataset, the backbone, the rows' models and activations; unfused: one row per "
                  "trial).", "",
                  "| rows (m) | unfused s | fused s | fused / unfused | goal | trial memory MiB unfused / fused |",
                  "|---|---|---|---|---|---|"]
        for r in section["sweeps"]:
            lines.append(f"| {r['rows']} ({', '.join(map(str, r['pool_sizes']))}) | {Stats(**r['unfused_s']).fmt()} | "
                         f"{Stats(**r['fused_s']).fmt()} | {Stats(**r['ratio']).fmt()} | <= {r['goal']:.2f} | "
                         f"{r['peak_mib']['unfused']:.0f} / {r['peak_mib']['fused']:.0f} |")
    return "\n".join(lines)


def summary(section: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for r in section["sweeps"]:
        ratio = r["ratio"]["median"]
        found.append({"measure": TITLE, "target": f"demo phase 2 of {r['rows']} rows fused <= {r['goal']:.2f}x "
                      f"unfused (CPU)", "result": f"{ratio:.2f}x", "met": ratio <= r["goal"]})
    if section["device"].startswith("cuda"):
        best = max((1 / r["ratio"]["median"] for r in section["steps"] if r["rows"] == 4), default=float("nan"))
        found.append({"measure": TITLE, "target": f"GPU sweep throughput fused >= {GPU_GOAL:.0f}x (R = 4, bf16)",
                      "result": f"{best:.2f}x", "met": best >= GPU_GOAL})
    return found
