"""What a sweep will do, said before it does it: its tables and rows, the distinct stages it trains (and those the
stage store already holds), its trials, and an estimate of the compute from step times measured on this machine.

Printed by the driver before anything is trained (for a suite always, for any sweep with dry_run=true), so that a
user knows whether the command is 30 minutes or 300 GPU-hours before starting it.
"""
from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from experiments.pretrain_demo import pretrain_seconds, pretrained_here
from experiments.suites import split_label
from lpt_core.config import LPTConfig, to_dict
from lpt_core.cost import format_duration, seconds_per_image, stage_cost
from lpt_core.data import build_dataset
from lpt_core.runtime import resolve_device
from orchestration.plan.sweep_plan import SweepPlan


@dataclass
class Estimate:
    """The plan's work: distinct stages to train, with their estimated seconds on this machine."""

    stages: dict[str, str]  # stage key -> stage name, every distinct stage of the plan
    cached: set[str]  # the keys the stage store holds
    backbones: list[Path]  # demo backbones to pretrain (not in the cache)
    seconds: dict[str, float] = field(default_factory=dict)  # key (stage key or backbone path) -> estimated seconds
    device: str = ""
    failure: str = ""  # why no estimate could be made

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values()) if not self.failure else float("nan")


def _missing_backbones(plan: SweepPlan) -> list[Path]:
    paths = {Path(t.config.backbone.weights_file) for t in plan.trials.values()
             if pretrained_here(t.config, plan.pretrain)}
    return sorted(p for p in paths if not p.is_file())


def _cost_key(cfg: LPTConfig, stage: str) -> str:
    """What the time per image depends on: the stage, the architecture, the input size and the prompt's shape
    (length, k and how the k are combined: concat lengthens the sequence); the pool size and the query function
    change it by a few percent, so one measurement serves them."""
    p = cfg.prompt
    return json.dumps([stage, cfg.backbone.name, cfg.backbone.model_kwargs, cfg.data.img_size, p.length, p.shared,
                       p.top_k, p.ensemble, cfg.device, cfg.threads, cfg.precision], sort_keys=True, default=str)


def estimate(plan: SweepPlan, done: set[str], log: Callable[[str], None] = print) -> Estimate:
    """done: the stage keys the stage store holds."""
    stages = plan.stage_configs()
    result = Estimate({key: stage for key, (stage, _) in stages.items()}, set(stages) & done,
                      _missing_backbones(plan))
    todo = {key: value for key, value in stages.items() if key not in done}
    # on a GPU in a child process: a CUDA context the driver kept would take memory from the trials beside it
    pool = (ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            if todo and resolve_device(plan.base.device).type == "cuda" else None)

    def measure(cfg: LPTConfig, stage: str, classes: int) -> tuple[float, float]:
        if pool is None:
            return seconds_per_image(cfg, stage, classes)
        return pool.submit(seconds_per_image, cfg, stage, classes).result()

    try:
        sizes = {}
        per_image: dict[str, tuple[float, float]] = {}
        for key, (stage, cfg) in todo.items():
            data = json.dumps(to_dict(cfg)["data"], sort_keys=True, default=str)
            if data not in sizes:
                bundle = build_dataset(cfg.data)
                sizes[data] = (len(bundle.train), len(bundle.test), bundle.num_classes)
            train, test, classes = sizes[data]
            cost_key = _cost_key(cfg, stage)
            if cost_key not in per_image:
                if not per_image:
                    log("measuring step times here for the estimate ...")
                per_image[cost_key] = measure(cfg, stage, classes)
            result.seconds[key] = stage_cost(cfg, stage, train, test).seconds(per_image[cost_key])
        for path in result.backbones:
            cfg = next(t.config for t in plan.trials.values() if t.config.backbone.weights_file == str(path))
            result.seconds[str(path)] = pretrain_seconds(cfg.backbone, cfg.data, plan.pretrain)
        result.device = str(resolve_device(plan.base.device))
    except Exception as err:  # no data here, no weights: the plan stands, only the estimate is missing
        result.failure = (str(err).splitlines() or [type(err).__name__])[0][:300]
    finally:
        if pool is not None:
            pool.shutdown()
    return result


def plan_lines(plan: SweepPlan, found: Estimate) -> list[str]:
    """The plan as printed: tables, rows, stages, trials, the stage store, the compute."""
    seeds = plan.settings.seeds
    lines = []
    suite = plan.suite
    if suite is not None:
        lines.append(f"plan: suite {suite.name!r} on {plan.experiment}, seeds {seeds}: {len(suite.tables)} tables, "
                     f"{len(plan.aliases)} rows, {len(plan.points)} distinct (rows that run the same stages are "
                     f"trained once)")
        for table in suite.tables:
            rows = [label for label in plan.aliases if split_label(label)[0] == table.ablation]
            shared = [f"{split_label(label)[1]} = {plan.aliases[label]}" for label in rows
                      if plan.aliases[label] != label]
            lines.append(f"  {table.title} ({table.ablation}): {len(rows)} rows"
                         + (f"; trained as another table's row: {', '.join(shared)}" if shared else ""))
    else:
        lines.append(f"plan: ablation {plan.ablation.name!r} on {plan.experiment}, seeds {seeds}: "
                     f"{len(plan.points) if not plan.optuna else plan.settings.search.num_samples} rows"
                     + (" (search=optuna: trials sampled as it runs)" if plan.optuna else ""))
    counts = Counter(found.stages.values())
    kinds = ", ".join(f"{n} {stage}" for stage, n in counts.items())
    # distinct stages if each table were its own sweep (a stage two tables share counted twice)
    separate = sum(len(keys) for keys in plan.table_stage_keys().values()) if suite is not None else 0
    lines.append(f"stages: {len(found.stages)} distinct ({kinds})"
                 + (f", against {separate} if each table ran as its own sweep" if separate else "")
                 + f"; the stage store holds {len(found.cached)}, {len(found.stages) - len(found.cached)} to train"
                 + (f"; {len(found.backbones)} demo backbone(s) to pretrain" if found.backbones else ""))
    lines.append(f"trials: {len(plan.trials)} ({len(plan.points)} rows x {len(seeds)} seed(s))" if not plan.optuna
                 else f"trials: {plan.settings.search.num_samples} sampled by Optuna on the base row's phase 1")
    if found.failure:
        lines.append(f"compute: no estimate ({found.failure})")
    elif plan.optuna:
        lines.append(f"compute: the upstream stages about {format_duration(found.total_seconds)} on {found.device}; "
                     f"each sampled trial adds its phase 2")
    else:
        lines.append(f"compute: about {format_duration(found.total_seconds)} of training and evaluation on "
                     f"{found.device} (step times measured here, {plan.base.threads or 'default'} thread(s) per "
                     f"trial), divided among the trial slots the cluster has")
    return lines


def wall_line(found: Estimate, slots: int) -> str:
    return (f"estimate: about {format_duration(found.total_seconds / max(1, slots))} on {slots} trial slot(s) "
            f"(compute {format_duration(found.total_seconds)})")

