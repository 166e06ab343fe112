"""How a sweep's trials become Tune trials, decided once the cluster's trial slots are known: which phase-2 rows
train fused in one trial (lpt_core.fused), and which upstream stages get a Tune run of their own before them.

Rows fuse when they share a fusion key (lpt_core.stages.fusion_key: the phase 1 they start from, the seed and
their data stream). How many fused trials a sweep gets is a wall-time decision: a fused trial of R rows costs less
than R separate trials in device time, but more than one of them in wall time, so fusing pays only when rows
would otherwise queue. With as many free trial slots as rows, every row keeps its own trial; with fewer, the rows
of each fusion key are split into as many fused trials as the slots give them (in proportion to the key's share
of the rows), each of at most fuse_max_rows rows, sizes as even as row order allows.

Never fused: grid rows of a search=optuna sweep (each trial samples its own values), rows under scheduler=asha
(it stops single trials), joint rows and rows that stop after phase 1 (nothing is shared), and rows whose phase 1
is their own (stages.cache=false).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lpt_core.stages import fusion_key
from orchestration.plan.sweep_plan import SweepPlan
from orchestration.plan.trial_specs import TrialSpec, trial_id


@dataclass(frozen=True)
class TrialUnit:
    """What one Tune trial of the sweep's trials run trains: one row, or several rows fused (same seed)."""

    rows: tuple[str, ...]
    seed: int

    def tune_config(self) -> dict[str, Any]:
        """The trial's Tune config: 'row' (the progress table's column; '5+10' for a fused trial) and, where fused,
        'rows', which lpt_trainable reads."""
        if len(self.rows) == 1:
            return {"row": self.rows[0], "seed": self.seed}
        return {"row": "+".join(self.rows), "rows": list(self.rows), "seed": self.seed}


@dataclass(frozen=True)
class FusionPlan:
    units: list[TrialUnit]
    summary: list[str]  # what the driver prints before training

    @property
    def fused(self) -> list[TrialUnit]:
        return [unit for unit in self.units if len(unit.rows) > 1]


def _fusable(trial: TrialSpec) -> bool:
    chain = trial.chain
    return len(chain) == 2 and chain[-1].stage == "phase2" and chain[-1].upstream == chain[0].key


def _why_not(plan: SweepPlan) -> str | None:
    s = plan.settings
    if s.fuse == "off":
        return "fuse=off"
    if plan.optuna:
        return "search=optuna samples each trial's own values"
    if s.scheduler == "asha":
        return "scheduler=asha stops trials one at a time"
    if not s.stages.cache:
        return "stages.cache=false gives every row its own phase 1"
    return None


def _split(rows: list[str], groups: int) -> list[tuple[str, ...]]:
    """rows in `groups` consecutive chunks whose sizes differ by at most one."""
    size, extra = divmod(len(rows), groups)
    chunks, start = [], 0
    for i in range(groups):
        end = start + size + (1 if i < extra else 0)
        chunks.append(tuple(rows[start:end]))
        start = end
    return chunks


def plan_fusion(plan: SweepPlan, slots: int) -> FusionPlan:
    """The trials run's units for a cluster with `slots` concurrent trials (see the module docstring)."""
    trials = list(plan.trials.values())
    single = [TrialUnit((t.row,), t.seed) for t in trials]
    reason = _why_not(plan)
    if reason is not None:
        return FusionPlan(single, [f"fusion: off ({reason}); {len(single)} trial(s), one per row and seed"])
    classes: dict[tuple[str, int], list[TrialSpec]] = {}
    for trial in trials:
        if _fusable(trial):
            classes.setdefault((fusion_key(trial.config), trial.seed), []).append(trial)
    if len(trials) <= slots or not any(len(members) > 1 for members in classes.values()):
        why = (f"{slots} trial slot(s) for {len(trials)} trial(s): separate trials finish sooner"
               if len(trials) <= slots else "no two rows share a phase 1, seed and data stream")
        return FusionPlan(single, [f"fusion: none ({why})"])
    fused_ids = {t.trial_id for members in classes.values() for t in members}
    units = [TrialUnit((t.row,), t.seed) for t in trials if t.trial_id not in fused_ids]
    cap = max(1, plan.settings.fuse_max_rows)
    for members in classes.values():
        share = max(1, math.ceil(slots * len(members) / len(trials)))
        groups = min(len(members), max(math.ceil(len(members) / cap), share))
        units += [TrialUnit(rows, members[0].seed) for rows in _split([t.row for t in members], groups)]
    fused = [u for u in units if len(u.rows) > 1]
    lines = [f"fusion: {len(trials)} rows x seeds on {slots} trial slot(s) -> {len(units)} trial(s), {len(fused)} "
             f"fused (their rows share each batch's backbone forward; fuse=off trains every row alone)"]
    lines += [f"  fused: {plan.ablation.axis} = {', '.join(u.rows)} (seed {u.seed})" for u in fused]
    return FusionPlan(units, lines)


def shared_upstream(plan: SweepPlan, units: list[TrialUnit],
                    missing: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
    """The missing upstream stages (phase 1) that get a Tune run of their own, before the trials: those that two or
    more of the trials' units start from, or, with search=optuna, every one (its trials are sampled as it goes).
    A stage only one unit needs is trained at the head of that unit's chain: nothing would wait for it, and a Tune
    run of its own would cost a round of trial start-ups and hold every phase 2 back until the last phase 1 ends.
    """
    if plan.optuna:
        return missing
    users: dict[str, int] = {}
    for unit in units:
        keys = {spec.key for row in unit.rows for spec in plan.trials[trial_id(row, unit.seed)].chain[:-1]}
        for key in keys:
            users[key] = users.get(key, 0) + 1
    return {key: needed_by for key, needed_by in missing.items() if users.get(key, 0) > 1}
