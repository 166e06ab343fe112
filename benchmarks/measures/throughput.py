"""Measure 1: train-step throughput (images/s of the full dual step) in phase 1 and phase 2, per model shape.

Random-weight ViT-T/S/B at 224 px and the demo's micro ViT (its model, image size and prompt length read from
the demo experiment's config), PromptConfig defaults otherwise (P = 10, m = 20, k = 2, K = L / 2), batches of
random tensors already on the device, fixed torch threads.
"""
from __future__ import annotations

from typing import Any

from benchmarks.context import Context
from benchmarks.flops import count_flops
from benchmarks.steps import lpt_step, random_batch, shape_of
from benchmarks.timing import Stats, interleaved, throughput

TITLE = "1. Train step throughput"
STAGES = ("phase1", "phase2")


def run(ctx: Context) -> dict[str, Any]:
    rows = []
    for shape, per_branch in ctx.plan.throughput.items():
        model = ctx.model(shape)
        batch = random_batch(shape, per_branch, ctx.device)
        for phase in STAGES:
            step = lpt_step(model, phase, ctx.device, ctx.precision)
            secs = interleaved({phase: lambda: step(batch)}, ctx.plan.repeats, ctx.plan.warmup, ctx.sync)[phase]
            unit = random_batch(shape, 1, ctx.device)  # FLOPs scale with the batch: count them on 1 + 1
            flops = count_flops(lambda: step(unit)) / unit.size * batch.size
            rate = throughput(secs, batch.size)
            rows.append({"shape": shape, "phase": phase, "img_size": shape_of(shape).img_size,
                         "batch": f"{per_branch}+{per_branch}",
                         "images_per_s": rate.as_dict(), "step_s": Stats.of(secs).as_dict(),
                         "gflop_per_image": flops / batch.size / 1e9,
                         "achieved_gflops": flops / Stats.of(secs).median / 1e9})
            ctx.stamp(f"throughput {shape} {phase}: {rate.fmt()} img/s")
    return {"title": TITLE, "device": str(ctx.device), "precision": ctx.precision, "threads": ctx.threads,
            "rows": rows}


def images_per_s(section: dict[str, Any], shape: str, phase: str) -> float | None:
    for row in section.get("rows", []):
        if row["shape"] == shape and row["phase"] == phase:
            return row["images_per_s"]["median"]
    return None


def markdown(section: dict[str, Any]) -> str:
    lines = [f"Device {section['device']}, {section['precision']}, {section['threads']} torch thread(s); "
             "random-weight models, random input tensors (no data loading), full dual step "
             "(forward of both batches, A-GCL + matching loss, backward, SGD).", "",
             "| model | px | batch (cb+ib) | phase | images/s median (min-max) | step s | GFLOP/image | GFLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        lines.append(f"| {r['shape']} | {r['img_size']} | {r['batch']} | {r['phase']} | "
                     f"{Stats(**r['images_per_s']).fmt()} | {Stats(**r['step_s']).fmt()} | "
                     f"{r['gflop_per_image']:.3g} | {r['achieved_gflops']:.3g} |")
    return "\n".join(lines)


def summary(section: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {(r["shape"], r["phase"]): r["images_per_s"]["median"] for r in section["rows"]}
    text = ", ".join(f"{s} {p[-1]}: {v:.3g}" for (s, p), v in rows.items())
    return [{"measure": TITLE, "target": "(no target; images/s, phase 1 / 2)", "result": text, "met": None}]
