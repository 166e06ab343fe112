"""From the composed config to a validated sweep plan: every row and seed is turned into a typed LPTConfig
before Ray starts, so a bad value fails in seconds with its key, not hours later inside a trial.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from experiments.ablations import RUN_UNTIL, Ablation, get_ablation
from experiments.pretrain_demo import DemoPretrainConfig
from experiments.settings import SweepSettings, apply_overrides, build_lpt, resolve_backbone, split
from lpt_core.config import ConfigError, flatten
from orchestration.settings import check_sweep_settings
from orchestration.stages import stage_chain


@dataclass
class SweepPlan:
    name: str
    experiment: str
    ablation: Ablation
    settings: SweepSettings
    base_lpt: dict[str, Any]  # weights_file resolved
    points: dict[str, dict[str, Any]]  # row label -> overrides (weights_file resolved per row where needed)
    pretrain: DemoPretrainConfig | None

    @property
    def optuna(self) -> bool:
        return self.settings.search.name == "optuna"

    def _identity(self) -> dict[str, Any]:
        """What the sweep computes: every trial's LPTConfig (the base, the rows, the seeds), the search and whether
        stages are shared. The settings that only place or pace the work (resources.*, max_concurrent_trials,
        max_failures, debug.*, cluster.*, tracking.*) are not in it, so a resume may change them."""
        return {"base": self.base_lpt, "points": self.points, "seeds": self.settings.seeds,
                "search": vars(self.settings.search) if self.optuna else "grid", "ablation": self.ablation.name,
                "cache": self.settings.stages.cache}

    def fingerprint(self) -> str:
        """Identifies what the sweep computes; a resumed sweep must have the same one."""
        encoded = json.dumps(self._identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]

    def content(self) -> dict[str, Any]:
        """The fingerprint's content as command-line keys (`phase2.batch_size`, `ablation.values`,
        `rows[5].prompt.pool_size`, `search.num_samples`): plan.json keeps it so that a refused resume can name
        what changed. JSON-normalised, so that it compares equal to the copy read back from plan.json."""
        identity = self._identity()
        search = identity["search"] if isinstance(identity["search"], dict) else {"name": identity["search"]}
        content = {**flatten(identity["base"]), "ablation": identity["ablation"], "ablation.values": list(self.points),
                   "seeds": identity["seeds"], "stages.cache": identity["cache"],
                   **{f"search.{key}": value for key, value in search.items()}}
        for row, overrides in self.points.items():
            content.update({f"rows[{row}].{key}": value for key, value in overrides.items()})
        return json.loads(json.dumps(content, default=str))

    def stage_names(self) -> list[str]:
        """The stages its trials run, in order (phase1, phase2; joint)."""
        names: list[str] = []
        for overrides in ([{}] if self.optuna else self.points.values()):
            values = dict(overrides)
            run_until = values.pop(RUN_UNTIL, None)
            for spec in stage_chain(apply_overrides(self.base_lpt, values), run_until):
                if spec.stage not in names:
                    names.append(spec.stage)
        return names

    def rows(self) -> list[tuple[str, int]]:
        return [(row, seed) for row in self.points for seed in self.settings.seeds]

    def upstream_keys(self) -> dict[str, tuple[str, int]]:
        """Distinct upstream (phase-1) stage keys -> one (row, seed) that needs it."""
        salt_free = self.settings.stages.cache
        found: dict[str, tuple[str, int]] = {}
        rows = self.rows() if not self.optuna else [(None, self.settings.seeds[0])]
        if not salt_free:
            return found
        for row, seed in rows:
            overrides = dict(self.points[row]) if row is not None else {}
            run_until = overrides.pop(RUN_UNTIL, None)
            chain = stage_chain(apply_overrides(self.base_lpt, {**overrides, "seed": seed}), run_until)
            for spec in chain[:-1]:
                found.setdefault(spec.key, (row, seed))
        return found


def _select_points(ablation: Ablation, experiment: str, values: list[Any] | None) -> dict[str, dict[str, Any]]:
    points = {p.label: dict(p.overrides) for p in ablation.points_for(experiment)}
    if values is None:
        return points
    wanted = [str(v) for v in values]
    unknown = [v for v in wanted if v not in points]
    if unknown:
        raise ConfigError(f"ablation.values={values}: {unknown} are not rows of {ablation.name!r}; "
                          f"rows: {list(points)}")
    return {label: points[label] for label in wanted}


def _validate_rows(plan: SweepPlan) -> None:
    for row, overrides in plan.points.items():
        values = {k: v for k, v in overrides.items() if k != RUN_UNTIL}
        for seed in plan.settings.seeds:
            try:
                build_lpt(apply_overrides(plan.base_lpt, {**values, "seed": seed}))
            except ConfigError as err:
                raise ConfigError(f"ablation {plan.ablation.name!r}, row {row!r}: {err}") from err
    if plan.optuna:
        if not plan.ablation.space:
            raise ConfigError(f"search=optuna: ablation {plan.ablation.name!r} has no continuous space; "
                              f"use search=grid (searchable: the 'loss' ablation)")
        for bound in ("low", "high"):
            values = {k: getattr(d, bound) for k, d in plan.ablation.space.items()}
            try:
                build_lpt(apply_overrides(plan.base_lpt, values))
            except ConfigError as err:
                raise ConfigError(f"ablation {plan.ablation.name!r}, search space {bound} end: {err}") from err


def resolve_backbones(plan: SweepPlan, log=print) -> None:
    """Demo only: pretrain (or fetch from cache) the micro ViT of the base config and of every row that changes
    the backbone, on the driver, before any trial starts."""
    if plan.pretrain is None:
        return
    base = resolve_backbone(build_lpt(plan.base_lpt), plan.pretrain, log=log)
    plan.base_lpt = apply_overrides(plan.base_lpt, {"backbone.weights_file": base.backbone.weights_file})
    for row, overrides in plan.points.items():
        if any(k.startswith("backbone.") for k in overrides):
            values = {k: v for k, v in overrides.items() if k != RUN_UNTIL}
            row_cfg = build_lpt(apply_overrides(plan.base_lpt, {**values, "backbone.weights_file": None}))
            resolved = resolve_backbone(row_cfg, plan.pretrain, log=log)
            overrides["backbone.weights_file"] = resolved.backbone.weights_file


def _absolute_paths(lpt: dict[str, Any]) -> None:
    """Tune runs each trial in its own folder: relative paths from the command line must not move with it."""
    for section, key in (("data", "cache_dir"), ("data", "root"), ("backbone", "weights_file")):
        value = lpt[section].get(key)
        if value and "://" not in value:
            lpt[section][key] = str(Path(value).expanduser().resolve())


def build_plan(cfg: DictConfig | dict) -> SweepPlan:
    """Validated plan; the demo backbones are resolved later (resolve_backbones), after the cheap checks."""
    spec = split(cfg)
    settings = check_sweep_settings(spec.settings)
    ablation = get_ablation(settings.ablation.name)
    build_lpt(spec.lpt)  # the base config alone must be valid
    _absolute_paths(spec.lpt)
    name = settings.sweep.name or f"{ablation.name}-{spec.name}"
    if settings.search.name == "optuna" and settings.ablation.values is not None:
        raise ConfigError("ablation.values selects grid rows; it has no meaning with search=optuna")
    plan = SweepPlan(name, spec.name, ablation, settings, spec.lpt,
                     _select_points(ablation, spec.name, settings.ablation.values), spec.pretrain)
    _validate_rows(plan)
    return plan
