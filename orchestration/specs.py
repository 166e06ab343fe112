"""The typed forms the driver hands on, each built once and never converted again.

- `TrialSpec`: one trial (a row of the ablation and a seed) with its LPTConfig, validated once, and the stages it
  runs. The driver builds every grid trial; an Optuna trial builds its own from the values it was given.
- `SweepContext`: what every trial of a sweep shares, the table of trials included. Tune hands it to each trial
  (tune.with_parameters); a trial's own Tune config holds only its row and seed, or the values Optuna sampled.
- `PlanRecord`: plan.json, what a sweep computes (its fingerprint and, key by key, its content) and what its
  report needs; written by the driver, read back by a resume and by the report.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.settings import DebugSettings, TrackingSettings, apply_overrides
from lpt_core.config import ConfigError, LPTConfig, from_dict, to_dict
from lpt_core.files import atomic_write_bytes
from orchestration.stages import StageSpec, stage_chain

BASE_ROW = "base"  # the row of an Optuna search's upstream trial: the base configuration, nothing sampled
PLAN_FILE = "plan.json"
STATE_FILE = "state.json"


def read_state(folder: Path) -> dict[str, Any]:
    """state.json of a sweep folder (status, failed and stopped trials); {} before the driver has written one."""
    path = folder / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def with_overrides(cfg: LPTConfig, overrides: dict[str, Any]) -> LPTConfig:
    """A validated copy of `cfg` with dotted keys set (an ablation row, Optuna's sampled values, the seed)."""
    return from_dict(apply_overrides(to_dict(cfg), overrides))


def trial_id(row: str, seed: int) -> str:
    """A trial's name in state.json, trials.json and MLflow: '<row>/seed=<seed>'."""
    return f"{row}/seed={seed}"


@dataclass(frozen=True)
class TrialSpec:
    trial_id: str
    row: str  # the ablation row's label; an Optuna trial's sampled values; BASE_ROW
    seed: int
    config: LPTConfig  # what run_phase receives, unchanged, for every stage of the chain
    chain: tuple[StageSpec, ...]  # the stages it runs, upstream first

    @classmethod
    def build(cls, row: str, seed: int, config: LPTConfig, run_until: str | None,
              salt_with: str | None) -> TrialSpec:
        """salt_with: the sweep's name when stages are not shared (stages.cache=false): each key is then salted
        with it and the trial id, so no other trial or sweep finds it."""
        ident = trial_id(row, seed)
        salt = "" if salt_with is None else f"{salt_with}/{ident}"
        return cls(ident, row, seed, config, stage_chain(config, run_until, salt))


def tune_values(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's own values from its Tune config: a grid trial's {'row', 'seed'} (nested under 'trial') or
    Optuna's sampled keys and 'seed'."""
    return {k: v for k, v in {**config, **config.get("trial", {})}.items() if k != "trial"}


@dataclass(frozen=True)
class SweepContext:
    sweep: str
    ablation: str
    experiment: str
    axis: str
    trials: dict[str, TrialSpec]  # by trial id: every grid trial; with Optuna, the base row's (its upstream)
    base: LPTConfig  # what an Optuna trial's sampled values apply to
    space: tuple[str, ...]  # the keys Optuna samples, sorted (empty for a grid)
    cache: bool  # stages.cache: stages shared between trials and sweeps
    stage_root: Path
    tracking: TrackingSettings  # its uri resolved (the sweep's SQLite store by default)
    parent_run_id: str
    debug: DebugSettings
    upstream_only: bool = False  # the upstream Tune run: each trial stops before its last stage

    def _sampled(self, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        sampled = {key: values[key] for key in self.space}
        return ", ".join(f"{key.split('.')[-1]}={value:.4g}" for key, value in sampled.items()), sampled

    def trial_id(self, values: dict[str, Any]) -> str:
        """The id of the trial whose tune_values these are (without building it)."""
        row = values["row"] if "row" in values else self._sampled(values)[0]
        return trial_id(row, values["seed"])

    def trial(self, values: dict[str, Any]) -> TrialSpec:
        """The trial whose tune_values these are: from the table, or, for Optuna, built (and validated) here."""
        if "row" in values:
            return self.trials[trial_id(values["row"], values["seed"])]
        row, sampled = self._sampled(values)
        config = with_overrides(self.base, {**sampled, "seed": values["seed"]})
        return TrialSpec.build(row, values["seed"], config, None, None if self.cache else self.sweep)


@dataclass(frozen=True)
class PlanRecord:
    fingerprint: str
    name: str
    ablation: str
    experiment: str
    axis: str
    rows: list[str]
    seeds: list[int]
    search: str  # grid | optuna
    metric: str
    stage_root: str
    content: dict[str, Any] | None = None  # None: written by a version that kept only the fingerprint
    mode: str = "max"  # search.mode: whether a larger metric is better
    tracking_experiment: str = "lpt"  # the MLflow experiment (the default where an earlier version wrote none)
    tracking_uri: str | None = None  # the store its runs are in, credentials redacted; None: an earlier version

    def tracking_changes(self, other: PlanRecord) -> list[str]:
        """`key=saved -> given` for each tracking setting in which `other` differs (none for a plan.json of an
        earlier version, which did not record where it tracked)."""
        if self.tracking_uri is None:
            return []
        pairs = [("tracking.uri", self.tracking_uri, other.tracking_uri),
                 ("tracking.experiment", self.tracking_experiment, other.tracking_experiment)]
        return [f"{key}={saved!r} -> {given!r}" for key, saved, given in pairs if saved != given]

    def write(self, folder: Path) -> None:
        payload = json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True, default=str)
        atomic_write_bytes(folder / PLAN_FILE, payload.encode())

    @classmethod
    def read(cls, folder: Path) -> PlanRecord:
        """The record of an existing sweep; a damaged or foreign plan.json is refused, never overwritten."""
        path = folder / PLAN_FILE
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: unreadable ({err}); it was left unchanged. Use another sweep.name") from err
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        missing = [name for name in required if not isinstance(values, dict) or name not in values]
        if missing:
            raise ConfigError(f"{path}: not a sweep plan (missing {missing}); it was left unchanged. "
                              f"Use another sweep.name")
        return cls(**{f.name: values[f.name] for f in fields if f.name in values})
