"""The demo runs that measures 3 and 4 share: interleaved rounds of
(a) `orchestration/sweep.py ablation=group_size`, phase-1 cache on, one trial at a time,
(b) the plain in-process loop over run_stage (benchmarks/plain_loop.py) doing the same stages,
(c) the same sweep with stages.cache=false (every trial trains its own phase 1),
each a fresh process (Ray starts cold), after the demo's micro ViT has been pretrained into the shared cache.

The runs take minutes each, so on a shared machine the training speed itself can drift between them (other
tenants' load). `normalized_wall` removes that drift: each run's training epochs are re-timed at the images/s of
all runs together, leaving everything else (start-up, evaluation, orchestration) as measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmarks.context import Context
from benchmarks.sweeps import ProcessRun, SweepRun, SweepRunner

KINDS = ("sweep_cached", "loop", "sweep_uncached")


@dataclass
class DemoRuns:
    pretrain_s: float
    cached: list[SweepRun] = field(default_factory=list)
    uncached: list[SweepRun] = field(default_factory=list)
    loops: list[tuple[ProcessRun, dict[str, Any]]] = field(default_factory=list)
    fixed_costs: dict[str, float] | None = None

    def training(self) -> list[dict[str, float]]:
        """train_s and images of every run."""
        sweeps = [{k: sum(r.training(st)[k] for st in ("phase1", "phase2")) for k in ("train_s", "images")}
                  for r in self.cached + self.uncached]
        loops = [{k: sum(st[k] for st in result["stages"]) for k in ("train_s", "images")}
                 for _, result in self.loops]
        return sweeps + loops

    def common_rate(self) -> float:
        """images/s of the training epochs of all runs together."""
        runs = self.training()
        return sum(r["images"] for r in runs) / sum(r["train_s"] for r in runs)

    def normalized_wall(self, wall_s: float, train: dict[str, float]) -> float:
        return wall_s - train["train_s"] + train["images"] / self.common_rate()


def demo_runs(ctx: Context) -> DemoRuns:
    """Runs the rounds once per benchmark run; measures 3 and 4 both read them."""
    if "demo_runs" in ctx.shared:
        if isinstance(ctx.shared["demo_runs"], Exception):  # failed for the measure that ran them: do not retry
            raise RuntimeError("the demo runs failed (see the previous measure's error)")
        return ctx.shared["demo_runs"]
    try:
        ctx.shared["demo_runs"] = _run(ctx)
    except Exception as err:
        ctx.shared["demo_runs"] = err
        raise
    return ctx.shared["demo_runs"]


def _run(ctx: Context) -> DemoRuns:
    runner = SweepRunner(ctx, "orchestration")
    ctx.stamp("demo: pretraining the micro ViT (or finding it in the cache)")
    runs = DemoRuns(pretrain_s=runner.prepare_backbone())
    rows = ctx.plan.demo_rows
    for r in range(ctx.plan.sweep_rounds):
        order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]
        for kind in order:
            if kind == "loop":
                runs.loops.append(runner.plain_loop(rows))
            else:
                cache = kind == "sweep_cached"
                run = runner.sweep(f"{'cached' if cache else 'uncached'}-r{r}", cache=cache, rows=rows)
                (runs.cached if cache else runs.uncached).append(run)
            ctx.stamp(f"demo round {r}: {kind} done")
    if ctx.fixed_costs:
        runs.fixed_costs = runner.fixed_costs()
        ctx.stamp("demo: fixed-cost probe done")
    return runs
