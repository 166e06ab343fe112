"""Measure 2: this project's phase-2 step against the naive reference (benchmarks/naive_reference.py).

Both steps train the same trainable tensors of one LPTModel with the same losses and optimizer; only the forward
differs. Their logits are compared in eval mode (no dropout) before timing, in the same run. The speed-up is the
per-round ratio naive / LPT of interleaved rounds. The profile splits each step into parts (query pass, prompted
blocks, backward, loss, optimizer) and adds what loading the batch would cost (from measure 5).
"""
from __future__ import annotations

from typing import Any

import torch

from benchmarks.context import Context
from benchmarks.flops import count_flops
from benchmarks.measures.data_pipeline import loader_seconds
from benchmarks.naive_reference import NaivePhase2
from benchmarks.steps import DualBatch, DualStep, lpt_step, random_batch
from benchmarks.timing import PartTimer, Stats, interleaved, ratios
from lpt_core.model import LPTModel, LPTOutput
from lpt_core.runtime import autocast

TITLE = "2. Phase 2 against the naive reference"
TOLERANCE = 1e-4  # max |logit difference|, cosine logits in [-1, 1]
TARGETS = {"cpu": (1.5, 1.25), "cuda": (2.5, None)}  # (target, floor) of naive-fp32 / LPT at the device precision


def logits_check(model: LPTModel, naive: NaivePhase2, batch: DualBatch) -> dict[str, Any]:
    """fp32, eval mode: both forwards on the same batch; also whether they matched the same prompts."""
    model.eval()
    with torch.no_grad():
        ours, ref = model(batch.images, "phase2"), naive(batch.images)
    model.train()
    diff = (ours.logits.float() - ref.logits.float()).abs().max().item()
    return {"max_abs_diff": diff, "tolerance": TOLERANCE, "identical": diff <= TOLERANCE,
            "same_topk": bool(torch.equal(ours.topk_idx, ref.topk_idx))}


def lpt_parts(model: LPTModel, step: DualStep, batch: DualBatch, timer: PartTimer) -> None:
    """LPTModel.forward_grouped (phase 2, phase-1 query, block-K reuse) and DualStep, one timed part at a time."""
    depth, pool = len(model.backbone.blocks), model.group_pool
    with autocast(step.device, step.precision):
        block_k, query = timer("query pass", lambda: model.query_pass(batch.images, track_block_k=False))
        topk_idx, topk_sim = timer("match + select", lambda: pool.match(query, model.cfg.top_k))
        group = timer("match + select", lambda: pool.select(topk_idx, model.cfg.ensemble))
        logits = timer("prompted blocks", lambda: model.classify(
            model.cls_feature(model.run_blocks(block_k, model.block_k, depth, group))))
    _loss_backward_update(step, LPTOutput(logits, query, topk_idx, topk_sim), batch, timer)


def naive_parts(naive: NaivePhase2, step: DualStep, batch: DualBatch, timer: PartTimer) -> None:
    pool, cfg = naive.lpt.group_pool, naive.lpt.cfg
    with autocast(step.device, step.precision):
        query = timer("query pass", lambda: naive.query(batch.images))
        topk_idx, topk_sim = timer("match + select", lambda: pool.match(query, cfg.top_k))
        group = timer("match + select", lambda: pool.select(topk_idx, cfg.ensemble))
        logits = timer("prompted blocks", lambda: naive.lpt.classify(naive.features(batch.images, group)))
    _loss_backward_update(step, LPTOutput(logits, query, topk_idx, topk_sim), batch, timer)


def _loss_backward_update(step: DualStep, out: LPTOutput, batch: DualBatch, timer: PartTimer) -> None:
    loss = timer("loss", lambda: step.loss(out, batch.labels))
    timer("backward", lambda: (step.optimizer.zero_grad(set_to_none=True), loss.backward()))
    timer("optimizer", step.optimizer.step)


def profile(ctx: Context, model: LPTModel, naive: NaivePhase2, steps: dict[str, DualStep],
            batch: DualBatch) -> dict[str, Any]:
    """Median seconds of each part over interleaved repeats, plus the loader's time for this batch."""
    runs: dict[str, list[dict[str, float]]] = {"lpt": [], "naive": []}

    def run(name: str) -> None:
        timer = PartTimer(ctx.sync)
        if name == "lpt":
            lpt_parts(model, steps["lpt"], batch, timer)
        else:
            naive_parts(naive, steps["naive"], batch, timer)
        runs[name].append(timer.parts)

    interleaved({name: (lambda n=name: run(n)) for name in runs}, ctx.plan.repeats, warmup=0, sync=ctx.sync)
    result = {}
    for name, samples in runs.items():
        parts = {part: Stats.of([s[part] for s in samples]).median for part in samples[0]}
        data = loader_seconds(ctx.sections.get("data"), batch.size, batch.images.shape[-1])
        if data is not None:
            parts["data (JPEG loader, 0 workers)"] = data
        result[name] = parts
    return result


def compare(ctx: Context, shape: str, per_branch: int) -> dict[str, Any]:
    model = ctx.model(shape)
    naive = NaivePhase2(model)
    batch = random_batch(shape, per_branch, ctx.device)
    check = logits_check(model, naive, batch)
    steps = {"lpt": lpt_step(model, "phase2", ctx.device, ctx.precision),
             "naive": DualStep(naive, model.set_trainable("phase2"), ctx.device, "fp32")}
    if ctx.device.type == "cuda":
        steps["lpt_fp32"] = lpt_step(model, "phase2", ctx.device, "fp32")
    secs = interleaved({name: (lambda s=s: s(batch)) for name, s in steps.items()}, ctx.plan.repeats,
                       ctx.plan.warmup, ctx.sync)
    unit = random_batch(shape, 1, ctx.device)
    flops = {name: count_flops(lambda s=s: s(unit)) / unit.size for name, s in steps.items()}
    target, floor = TARGETS[ctx.device.type]
    speedup = Stats.of(ratios(secs["naive"], secs["lpt"]))
    row = {"shape": shape, "batch": f"{per_branch}+{per_branch}", "logits": check,
           "step_s": {name: Stats.of(s).as_dict() for name, s in secs.items()},
           "images_per_s": {name: Stats.of([batch.size / x for x in s]).as_dict() for name, s in secs.items()},
           "gflop_per_image": {name: f / 1e9 for name, f in flops.items()},
           "flop_ratio_naive_over_lpt": flops["naive"] / flops["lpt"],
           "speedup": speedup.as_dict(), "target": target, "floor": floor,
           "met": speedup.median >= target and check["identical"],
           "above_floor": None if floor is None else speedup.median >= floor}
    if "lpt_fp32" in secs:
        row["speedup_fp32_vs_fp32"] = Stats.of(ratios(secs["naive"], secs["lpt_fp32"])).as_dict()
    if shape in ctx.plan.profile:
        row["profile_s"] = profile(ctx, model, naive, steps, batch)
    ctx.stamp(f"phase2 vs naive {shape}: x{speedup.fmt_ratio()} (logit diff {check['max_abs_diff']:.1e})")
    return row


def run(ctx: Context) -> dict[str, Any]:
    rows = [compare(ctx, shape, per_branch) for shape, per_branch in ctx.plan.naive.items()]
    return {"title": TITLE, "device": str(ctx.device), "precision": ctx.precision, "threads": ctx.threads,
            "rows": rows, "met": all(r["met"] for r in rows)}


def _profile_table(row: dict[str, Any]) -> list[str]:
    parts = row["profile_s"]
    names = list(dict.fromkeys([*parts["lpt"], *parts["naive"]]))
    lines = [f"Profile, {row['shape']} (median seconds per step; each part timed alone):", "",
             "| part | LPT s | share | naive s | share |", "|---|---|---|---|---|"]
    totals = {k: sum(v for p, v in parts[k].items() if not p.startswith("data")) for k in parts}
    for name in names:
        cells = []
        for k in ("lpt", "naive"):
            value = parts[k].get(name)
            cells += ["-", "-"] if value is None else [f"{value:.3g}", f"{100 * value / totals[k]:.0f} %"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    step = row["step_s"]
    lines.append(f"| sum of compute parts (full step) | {totals['lpt']:.3g} ({step['lpt']['median']:.3g}) | | "
                 f"{totals['naive']:.3g} ({step['naive']['median']:.3g}) | |")
    return lines


def markdown(section: dict[str, Any]) -> str:
    lines = [f"Device {section['device']}; LPT at {section['precision']}, reference fp32; "
             f"{section['threads']} torch thread(s). Speed-up = naive step time / LPT step time, per interleaved "
             "round.", "",
             "| model | batch | LPT img/s | naive img/s | speed-up median (min-max) | target (floor) | met | "
             "GFLOP/img LPT / naive | max logit diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        floor = f" ({r['floor']}x)" if r["floor"] else ""
        met = "yes" if r["met"] else ("above floor" if r["above_floor"] else "no")
        lines.append(f"| {r['shape']} | {r['batch']} | {Stats(**r['images_per_s']['lpt']).fmt()} | "
                     f"{Stats(**r['images_per_s']['naive']).fmt()} | {Stats(**r['speedup']).fmt_ratio()}x | "
                     f">= {r['target']}x{floor} | {met} | {r['gflop_per_image']['lpt']:.3g} / "
                     f"{r['gflop_per_image']['naive']:.3g} | {r['logits']['max_abs_diff']:.1e} |")
    for r in section["rows"]:
        if "speedup_fp32_vs_fp32" in r:
            lines.append(f"\n{r['shape']}: LPT fp32 vs naive fp32: {Stats(**r['speedup_fp32_vs_fp32']).fmt_ratio()}x")
        if "profile_s" in r:
            lines += [""] + _profile_table(r)
    return "\n".join(lines)


def summary(section: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in section["rows"]:
        floor = f" (floor {r['floor']}x)" if r["floor"] else ""
        out.append({"measure": f"{TITLE}, {r['shape']}", "target": f">= {r['target']}x{floor}, identical logits",
                    "result": f"{Stats(**r['speedup']).fmt_ratio()}x, logit diff {r['logits']['max_abs_diff']:.1e}",
                    "met": r["met"] if r["met"] or not r["above_floor"] else "above floor"})
    return out
