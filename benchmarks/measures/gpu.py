"""Measure 6 (GPU only): ViT-B/16 224 bf16 phase-1 and phase-2 images/s with model FLOP utilisation, and packing
of four demo trials on one GPU (resources.gpu=0.25) against one at a time.

MFU = FLOPs of one step as executed (benchmarks/flops.py: the no-grad query pass, the prompt key/value
projections, the prompted forward and its backward, attention included) / step time / the device's dense bf16
peak. Packing runs the real orchestration twice on the demo's group-size ablation with its phase 1 already in
the stage store, so both runs train the same four phase-2 trials: aggregate throughput ratio = trial window one
at a time / trial window packed (see benchmarks/sweeps.py for the window).
"""
from __future__ import annotations

from typing import Any

import torch

from benchmarks.context import Context
from benchmarks.flops import count_flops
from benchmarks.machine import bf16_peak_flops
from benchmarks.steps import lpt_step, random_batch
from benchmarks.sweeps import SweepRunner
from benchmarks.timing import Stats, interleaved, throughput

TITLE = "6. GPU: ViT-B/16 bf16 and trial packing"
RUNS = {"serial": (("resources.gpu=1",), 1), "packed": (("resources.gpu=0.25",), 4)}  # overrides, concurrent


def vit_b(ctx: Context) -> list[dict[str, Any]]:
    model = ctx.model("vit_b")
    batch = random_batch("vit_b", ctx.plan.gpu_batch, ctx.device)
    peak = bf16_peak_flops(torch.cuda.get_device_name(ctx.device))
    rows = []
    for phase in ("phase1", "phase2"):
        step = lpt_step(model, phase, ctx.device, "bf16")
        secs = interleaved({phase: lambda: step(batch)}, ctx.plan.repeats, ctx.plan.warmup, ctx.sync)[phase]
        flops = count_flops(lambda: step(batch))
        median = Stats.of(secs).median
        rows.append({"phase": phase, "batch": f"{ctx.plan.gpu_batch}+{ctx.plan.gpu_batch}",
                     "images_per_s": throughput(secs, batch.size).as_dict(), "tflop_per_step": flops / 1e12,
                     "achieved_tflops": flops / median / 1e12, "mfu": flops / median / peak if peak else None})
        mfu = rows[-1]["mfu"]
        ctx.stamp(f"gpu vit_b {phase}: {rows[-1]['images_per_s']['median']:.0f} img/s, "
                  f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f} %'}")
    return rows


def packing(ctx: Context) -> dict[str, Any]:
    runner = SweepRunner(ctx, "packing")
    runner.prime_phase1(extra=RUNS["serial"][0])
    runs = {name: runner.sweep(name, cache=True, rows=(5, 10, 20, 40), extra=extra, concurrent=concurrent,
                               reuse_phase1=True)
            for name, (extra, concurrent) in RUNS.items()}
    windows = {name: run.trial_window("phase2") for name, run in runs.items()}
    images = runs["packed"].training("phase2")["images"]
    return {"trials": 4, "images_trained": images,
            "window_s": windows, "sweep_wall_s": {name: run.wall_s for name, run in runs.items()},
            "aggregate_images_per_s": {name: images / w for name, w in windows.items()},
            "ratio_packed_over_serial": windows["serial"] / windows["packed"]}


def run(ctx: Context) -> dict[str, Any]:
    if ctx.device.type != "cuda":
        return {"title": TITLE, "skipped": f"needs --device cuda on a GPU machine (this run: {ctx.device}, "
                                           f"CUDA available: {torch.cuda.is_available()})"}
    section: dict[str, Any] = {"title": TITLE, "device": torch.cuda.get_device_name(ctx.device),
                               "vit_b": vit_b(ctx)}
    ctx.release_models()
    try:
        section["packing"] = packing(ctx)
    except Exception as err:  # the GPU numbers above stay valid; say why packing could not be measured
        section["packing"] = {"error": f"{type(err).__name__}: {err}"}
    return section


def markdown(section: dict[str, Any]) -> str:
    if "skipped" in section:
        return f"Skipped: {section['skipped']}."
    lines = [f"{section['device']}, bf16 autocast, random-weight ViT-B/16 at 224 px.", "",
             "| phase | batch | images/s median (min-max) | TFLOP/step | TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    for r in section["vit_b"]:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a (unknown peak)"
        lines.append(f"| {r['phase']} | {r['batch']} | {Stats(**r['images_per_s']).fmt()} | "
                     f"{r['tflop_per_step']:.3g} | {r['achieved_tflops']:.3g} | {mfu} |")
    p = section["packing"]
    if "error" in p:
        lines += ["", f"Packing not measured: {p['error']}"]
    else:
        lines += ["", f"Packing, 4 demo phase-2 trials: one at a time {p['window_s']['serial']:.1f} s, "
                      f"four on one GPU (resources.gpu=0.25) {p['window_s']['packed']:.1f} s; aggregate throughput "
                      f"ratio {p['ratio_packed_over_serial']:.2f}x."]
    return "\n".join(lines)


def summary(section: dict[str, Any]) -> list[dict[str, Any]]:
    if "skipped" in section:
        return [{"measure": TITLE, "target": "(GPU only)", "result": "skipped: no GPU", "met": None}]
    text = ", ".join(f"{r['phase']} {r['images_per_s']['median']:.0f} img/s"
                     + (f" MFU {100 * r['mfu']:.0f} %" if r["mfu"] else "") for r in section["vit_b"])
    p = section["packing"]
    if "ratio_packed_over_serial" in p:
        text += f"; packing x{p['ratio_packed_over_serial']:.2f}"
    return [{"measure": TITLE, "target": "(report)", "result": text, "met": None}]
