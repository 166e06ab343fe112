"""From the composed config to a validated sweep plan: every row and seed is turned into a typed LPTConfig
before Ray starts, so a bad value fails in seconds with its key, not hours later inside a trial.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from experiments.ablations import RUN_UNTIL, Ablation
from experiments.suites import SUITES, Suite, find_ablation, split_label
from experiments.compose import split
from experiments.pretrain_demo import ensure_demo_weights, with_demo_weights
from experiments.schema import DemoPretrainConfig, SweepSettings
from lpt_core.config import ConfigError, LPTConfig, flatten, to_dict
from lpt_core.files import content_key
from orchestration.plan.record import PlanRecord
from orchestration.plan.trial_specs import BASE_ROW, SweepContext, TrialSpec
from orchestration.tracking.registry import artifact_root, default_tracking_uri, redact


@dataclass(frozen=True)
class SweepPlan:
    name: str
    experiment: str
    ablation: Ablation
    settings: SweepSettings
    base: LPTConfig  # the composed configuration, its paths absolute
    points: dict[str, dict[str, Any]]  # row label -> overrides, as the ablation declares them
    pretrain: DemoPretrainConfig | None
    trials: dict[str, TrialSpec]  # by trial id: every (row, seed); with Optuna, the base row (its upstream)
    # a suite: every row of its tables -> the row trained for it (rows whose trials are the same are trained once)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def suite(self) -> Suite | None:
        return SUITES.get(self.ablation.name)

    @property
    def optuna(self) -> bool:
        return self.settings.search.name == "optuna"

    def _identity(self) -> dict[str, Any]:
        """What the sweep computes: every trial's LPTConfig (the base, the rows, the seeds), the search and whether
        stages are shared. The settings that only place or pace the work (resources.*, max_concurrent_trials,
        max_failures, debug.*, cluster.*, tracking.*) are not in it, so a resume may change them."""
        return {"base": to_dict(self.base), "points": self.points, "seeds": self.settings.seeds,
                "search": vars(self.settings.search) if self.optuna else "grid", "ablation": self.ablation.name,
                "cache": self.settings.stages.cache}

    def fingerprint(self) -> str:
        """Identifies what the sweep computes; a resumed sweep must have the same one."""
        return content_key(self._identity())

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

    def tracking_uri(self) -> str:
        """The MLflow store of this sweep's runs: tracking.uri, or the one store under sweep.root."""
        return self.settings.tracking.uri or default_tracking_uri(self.settings.sweep.root)

    def artifact_root(self) -> Path | None:
        """Where the store's new experiments keep their artifacts (also when the store is reached through the
        sweep's own tracking server: the artifacts are files on the shared filesystem, not database rows)."""
        return artifact_root(self.tracking_uri(), self.settings.sweep.root)

    def record(self) -> PlanRecord:
        """plan.json of this plan (taken before the demo backbones are resolved: what the sweep computes)."""
        s = self.settings
        return PlanRecord(self.fingerprint(), self.name, self.ablation.name, self.experiment, self.ablation.axis,
                          list(self.points), s.seeds, s.search.name, self.ablation.metric,
                          str(Path(s.stages.root).resolve()), self.content(), s.search.mode, s.tracking.experiment,
                          redact(self.tracking_uri()))

    def context(self, tracking_uri: str, parent_run_id: str) -> SweepContext:
        """What every trial receives (tune.with_parameters)."""
        s = self.settings
        space = tuple(sorted(self.ablation.space)) if self.optuna else ()
        return SweepContext(self.name, self.ablation.name, self.experiment, self.ablation.axis, self.trials,
                            with_demo_weights(self.base, self.pretrain), space, s.stages.cache,
                            Path(s.stages.root).resolve(), dataclasses.replace(s.tracking, uri=tracking_uri),
                            parent_run_id, s.debug, metric=self.ablation.metric)

    def ensure_backbones(self, log: Callable[[str], None] = print) -> None:
        """Demo only: pretrains (or finds in the cache) each micro ViT the trials load, on the driver, before any
        trial starts."""
        ensure_demo_weights([trial.config for trial in self.trials.values()], self.pretrain, log)

    def stage_names(self) -> list[str]:
        """The stages its trials run, in order (phase1, phase2; joint)."""
        return list(dict.fromkeys(spec.stage for trial in self.trials.values() for spec in trial.chain))

    @property
    def folder(self) -> Path:
        """The sweep folder: sweep.root/<name>."""
        return (Path(self.settings.sweep.root) / self.name).resolve()

    def stage_configs(self) -> dict[str, tuple[str, LPTConfig]]:
        """Every distinct stage its trials run: key -> (stage name, the config of a trial that runs it)."""
        found: dict[str, tuple[str, LPTConfig]] = {}
        for trial in self.trials.values():
            for spec in trial.chain:
                found.setdefault(spec.key, (spec.stage, trial.config))
        return found

    def stage_keys(self) -> dict[str, str]:
        """Every distinct stage its trials run: key -> stage name."""
        return {key: stage for key, (stage, _) in self.stage_configs().items()}

    def table_stage_keys(self) -> dict[str, set[str]]:
        """A suite: per table (ablation), the stage keys of its rows (a merged row's under every table it is in)."""
        by_row: dict[str, set[str]] = {}
        for trial in self.trials.values():
            by_row.setdefault(trial.row, set()).update(spec.key for spec in trial.chain)
        tables: dict[str, set[str]] = {}
        for label, kept in self.aliases.items():
            tables.setdefault(split_label(label)[0], set()).update(by_row.get(kept, set()))
        return tables

    def upstream_keys(self) -> dict[str, tuple[str, int]]:
        """Distinct upstream (phase-1) stage keys -> one (row, seed) that needs it."""
        if not self.settings.stages.cache:
            return {}
        found: dict[str, tuple[str, int]] = {}
        for trial in self.trials.values():
            for spec in trial.chain[:-1]:
                found.setdefault(spec.key, (trial.row, trial.seed))
        return found


def _check_sweep_settings(settings: SweepSettings) -> SweepSettings:
    if settings.ablation is None:
        raise ConfigError("ablation: missing; pick one, e.g. `python orchestration/sweep.py ablation=group_size`")
    if not settings.seeds:
        raise ConfigError("seeds: needs at least one seed")
    if settings.resources.cpu <= 0 or settings.resources.gpu < 0:
        raise ConfigError(f"resources: cpu must be > 0 and gpu >= 0, got {settings.resources}")
    if settings.max_failures < 0 or settings.max_concurrent_trials < 0:
        raise ConfigError("max_failures and max_concurrent_trials must be >= 0")
    if settings.debug.hold_at_epoch is not None and not settings.debug.event_dir:
        raise ConfigError("debug.hold_at_epoch needs debug.event_dir (where the trial signals it holds and waits "
                          "for the release file)")
    if settings.fuse_max_rows < 1:
        raise ConfigError(f"fuse_max_rows={settings.fuse_max_rows}: must be >= 1 (fuse=off trains every row alone)")
    if settings.search.num_samples < 1 or settings.search.max_concurrent < 1:
        raise ConfigError("search.num_samples and search.max_concurrent must be >= 1")
    if not 0 <= settings.tracking.server_port <= 65535:
        raise ConfigError(f"tracking.server_port={settings.tracking.server_port}: a TCP port (1..65535), or 0 for "
                          f"a free one")
    return settings


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


def _trial(name: str, settings: SweepSettings, row: str, seed: int, config: LPTConfig,
           run_until: str | None, pretrain: DemoPretrainConfig | None) -> TrialSpec:
    """The trial, its demo backbone's weights file set (so its stage keys are final; the driver pretrains the
    backbones after the cheap checks)."""
    config = with_demo_weights(config, pretrain)
    return TrialSpec.build(row, seed, config, run_until, None if settings.stages.cache else name)


def _grid_trials(name: str, ablation: Ablation, settings: SweepSettings, base: LPTConfig,
                 points: dict[str, dict[str, Any]], pretrain: DemoPretrainConfig | None) -> dict[str, TrialSpec]:
    """Every (row, seed) as its validated LPTConfig: a bad value fails here, naming the row and the key."""
    trials = {}
    for row, overrides in points.items():
        values = {k: v for k, v in overrides.items() if k != RUN_UNTIL}
        for seed in settings.seeds:
            try:
                config = base.with_overrides({**values, "seed": seed})
            except ConfigError as err:
                raise ConfigError(f"ablation {ablation.name!r}, row {row!r}: {err}") from err
            trial = _trial(name, settings, row, seed, config, overrides.get(RUN_UNTIL), pretrain)
            trials[trial.trial_id] = trial
    return trials


def _optuna_trials(name: str, ablation: Ablation, settings: SweepSettings, base: LPTConfig,
                   pretrain: DemoPretrainConfig | None) -> dict[str, TrialSpec]:
    """The base row, the upstream of every sampled trial; the search space's ends are checked as configs."""
    if not ablation.space:
        raise ConfigError(f"search=optuna: ablation {ablation.name!r} has no continuous space; "
                          f"use search=grid (searchable: the 'loss' ablation)")
    for bound in ("low", "high"):
        try:
            base.with_overrides({k: getattr(d, bound) for k, d in ablation.space.items()})
        except ConfigError as err:
            raise ConfigError(f"ablation {ablation.name!r}, search space {bound} end: {err}") from err
    seed = settings.seeds[0]
    trial = _trial(name, settings, BASE_ROW, seed, base.with_overrides({"seed": seed}), None, pretrain)
    return {trial.trial_id: trial}


def _merge_identical_rows(trials: dict[str, TrialSpec], points: dict[str, dict[str, Any]],
                          reference: str | None) -> tuple[dict[str, TrialSpec], dict[str, dict[str, Any]],
                                                          dict[str, str]]:
    """A suite's rows whose trials run the same stages for every seed (the same stage keys: the reference
    configuration is a row of five tables) become one row, labelled by the reference where it is one of them, else
    by the first. Returns the trials and points of the rows kept, and every row's label -> the row kept for it."""
    chains: dict[str, list] = {}
    for trial in trials.values():
        chains.setdefault(trial.row, []).append((trial.seed, tuple(spec.key for spec in trial.chain)))
    kept: dict[tuple, str] = {}
    for row in sorted(points, key=lambda label: label != reference):  # the reference first: its label names the group
        kept.setdefault(tuple(sorted(chains[row])), row)
    aliases = {row: kept[tuple(sorted(chains[row]))] for row in points}
    rows = set(aliases.values())
    return ({ident: t for ident, t in trials.items() if t.row in rows},
            {row: overrides for row, overrides in points.items() if row in rows}, aliases)


def _absolute_paths(cfg: LPTConfig) -> LPTConfig:
    """Tune runs each trial in its own folder: relative paths from the command line must not move with it."""
    def absolute(value: str | None) -> str | None:
        return str(Path(value).expanduser().resolve()) if value and "://" not in value else value

    data = dataclasses.replace(cfg.data, cache_dir=absolute(cfg.data.cache_dir), root=absolute(cfg.data.root))
    backbone = dataclasses.replace(cfg.backbone, weights_file=absolute(cfg.backbone.weights_file))
    return dataclasses.replace(cfg, data=data, backbone=backbone)


def build_plan(cfg: DictConfig | dict) -> SweepPlan:
    """Every trial typed and validated, its stage keys final; the demo backbones are pretrained later
    (`SweepPlan.ensure_backbones`), after the cheap checks."""
    spec = split(cfg)
    settings = _check_sweep_settings(spec.settings)
    ablation = find_ablation(settings.ablation.name)
    base = _absolute_paths(spec.lpt)  # the base config alone must be valid
    name = settings.sweep.name or f"{ablation.name}-{spec.name}"
    # one MLflow experiment per dataset experiment (demo, places_lt, ...) unless tracking.experiment names one
    tracking = dataclasses.replace(settings.tracking, experiment=settings.tracking.experiment or spec.name)
    settings = dataclasses.replace(settings, tracking=tracking)
    if settings.search.name == "optuna" and settings.ablation.values is not None:
        raise ConfigError("ablation.values selects grid rows; it has no meaning with search=optuna")
    points = _select_points(ablation, spec.name, settings.ablation.values)
    suite = ablation.name in SUITES
    if settings.search.name == "optuna":
        if suite:
            raise ConfigError(f"search=optuna: {ablation.name!r} is a suite of tables; search one ablation of it")
        trials = _optuna_trials(name, ablation, settings, base, spec.pretrain)
        return SweepPlan(name, spec.name, ablation, settings, base, points, spec.pretrain, trials)
    trials = _grid_trials(name, ablation, settings, base, points, spec.pretrain)
    aliases = {}
    if suite:
        trials, points, aliases = _merge_identical_rows(trials, points, ablation.reference_for(spec.name))
    return SweepPlan(name, spec.name, ablation, settings, base, points, spec.pretrain, trials, aliases)
