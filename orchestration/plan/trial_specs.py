"""The typed forms the driver hands on, each built once and never converted again.

- `TrialSpec`: one trial (a row of the ablation and a seed) with its LPTConfig, validated once, and the stages it
  runs. The driver builds every grid trial; an Optuna trial builds its own from the values it was given.
- `SweepContext`: what every trial of a sweep shares, the table of trials included. Tune hands it to each trial
  (tune.with_parameters); a trial's own Tune config holds only its row and seed, or the values Optuna sampled.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.schema import DebugSettings, TrackingSettings
from lpt_core.config import LPTConfig
from lpt_core.stages import StageSpec, stage_chain

BASE_ROW = "base"  # the row of an Optuna search's upstream trial: the base configuration, nothing sampled


def trial_id(row: str, seed: int) -> str:
    """A trial's name in state.json, trials.json and MLflow: '<row>/seed=<seed>'."""
    return f"{row}/seed={seed}"


def split_trial_id(ident: str) -> tuple[str, int]:
    """'<row>/seed=<seed>' -> (row, seed): the inverse of trial_id."""
    row, _, seed = ident.rpartition("/seed=")
    return row, int(seed)


@dataclass(frozen=True)
class TrialSpec:
    trial_id: str
    row: str  # the ablation row's label; an Optuna trial's sampled values; BASE_ROW
    seed: int
    config: LPTConfig  # what run_stage receives, unchanged, for every stage of the chain
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
    """A trial's own values from its Tune config: a grid trial's {'row', 'seed'} or a fused trial's {'rows', 'seed'}
    (nested under 'trial'), or Optuna's sampled keys and 'seed'."""
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
    # upstream stages whose Tune run failed -> why: a trial on top of one ends failed at once (a resume reruns it)
    failed_upstream: dict[str, str] = dataclasses.field(default_factory=dict)
    metric: str = "acc"  # the ablation's metric: Tune's searcher and scheduler read it from every result

    def blocked_by(self, trial: TrialSpec) -> str | None:
        """Why `trial` cannot run: the failure of an upstream stage it starts from; None when it can."""
        reasons = [self.failed_upstream[spec.key] for spec in trial.chain if spec.key in self.failed_upstream]
        return reasons[0] if reasons else None

    def _sampled(self, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        sampled = {key: values[key] for key in self.space}
        return ", ".join(f"{key.split('.')[-1]}={value:.4g}" for key, value in sampled.items()), sampled

    def trial_id(self, values: dict[str, Any]) -> str:
        """The id of the trial whose tune_values these are (without building it)."""
        row = values["row"] if "row" in values else self._sampled(values)[0]
        return trial_id(row, values["seed"])

    def fused_trials(self, values: dict[str, Any]) -> list[TrialSpec] | None:
        """The rows of a fused trial (tune_values with 'rows'), None for any other trial."""
        if "rows" not in values:
            return None
        return [self.trials[trial_id(row, values["seed"])] for row in values["rows"]]

    def trial(self, values: dict[str, Any]) -> TrialSpec:
        """The trial whose tune_values these are: from the table, or, for Optuna, built (and validated) here."""
        if "row" in values:
            return self.trials[trial_id(values["row"], values["seed"])]
        row, sampled = self._sampled(values)
        config = self.base.with_overrides({**sampled, "seed": values["seed"]})
        return TrialSpec.build(row, values["seed"], config, None, None if self.cache else self.sweep)
