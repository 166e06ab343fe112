"""One Ray Tune run (the upstream stages, or the trials): search, scheduler, failure handling, restore, reruns.

A Tune run that already exists in the storage is restored (`Tuner.restore`, errored and unfinished trials
resumed), so OptunaSearch's state and the finished trials survive a dead driver; the trials themselves resume
from their newest checkpoint through the stage store. Trials that ended on purpose (NaN loss, out of memory) are
TERMINATED for Tune, which never runs them again: a resume runs them in a follow-up Tune run of their own.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import optuna
from ray import tune
from ray.tune import CLIReporter, ExperimentAnalysis
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter

from lpt_core.config import STAGES
from orchestration.plan.sweep_plan import SweepPlan
from orchestration.plan.trial_specs import SweepContext, tune_values
from orchestration.execute.trainable import FUSED_ROWS, lpt_trainable, unpacked
from orchestration.tracking.study import StudySearch, study_storage

TUNE_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore",
             "iterations_since_restore", "done", "epoch", "loss", "lr", "epoch_time_s", "train_images_per_s",
             "checkpoint_dir_name", "should_checkpoint", "trial_complete", "seed", "trial_id", "trial_failed"}
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}


def _trainable(plan: SweepPlan, context: SweepContext):
    resources = plan.settings.resources
    trainable = tune.with_parameters(lpt_trainable, context=context)
    return tune.with_resources(trainable, {"cpu": resources.cpu, "gpu": resources.gpu})


def _search_space(plan: SweepPlan, units: list[dict[str, Any]], optuna_search: bool) -> dict:
    if optuna_search:
        space = {}
        for key, dist in plan.ablation.space.items():
            if dist.integer:
                space[key] = tune.randint(int(dist.low), int(dist.high) + 1)
            else:
                space[key] = (tune.loguniform if dist.log else tune.uniform)(dist.low, dist.high)
        return {"seed": plan.settings.seeds[0], **space}
    return {"trial": tune.grid_search(units)}


def _tune_config(plan: SweepPlan, optuna_search: bool, early_stopping: bool) -> tune.TuneConfig:
    """early_stopping: ASHA may stop weak trials (scheduler=asha, the trials' run only: an upstream stage that others
    need is never stopped, and a rerun of failed trials runs each of them to its end)."""
    search = plan.settings.search
    search_alg, num_samples = None, 1
    if optuna_search:
        searcher = StudySearch(sampler=SAMPLERS[search.sampler](seed=search.seed), study_name=plan.name,
                               storage=study_storage(plan.folder))
        search_alg, num_samples = ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent), search.num_samples
    epochs = max(plan.base.stage_config(p).epochs for p in STAGES)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1, grace_period=1)
                 if early_stopping else FIFOScheduler())
    return tune.TuneConfig(
        metric=plan.ablation.metric, mode=search.mode, search_alg=search_alg, scheduler=scheduler,
        num_samples=num_samples, max_concurrent_trials=plan.settings.max_concurrent_trials or None,
        reuse_actors=True,  # a new worker process per trial would re-import torch, timm and MLflow every time
        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
    )


def _trial_name(trial: Trial) -> str:
    """A module function, not a lambda: Tune pickles it into every trial of every experiment snapshot."""
    return f"trial_{trial.trial_id}"


def _run_config(plan: SweepPlan, storage: str, name: str, params: dict[str, str],
                callbacks: list[tune.Callback]) -> tune.RunConfig:
    reporter = CLIReporter(metric_columns={"stage": "stage", "epoch": "epoch", "acc": "acc", "few": "few"},
                           parameter_columns=params, max_report_frequency=30, sort_by_metric=False)
    return tune.RunConfig(name=name, storage_path=storage,
                          failure_config=tune.FailureConfig(max_failures=plan.settings.max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2), progress_reporter=reporter,
                          callbacks=callbacks, verbose=1)


def _columns(plan: SweepPlan, optuna_search: bool, prefix: str = "") -> dict[str, str]:
    """The progress table's parameter columns (a rerun nests every trial's config under 'trial/')."""
    if optuna_search:
        return {f"{prefix}{k}": k.split(".")[-1] for k in plan.ablation.space}
    return {"trial/row": plan.ablation.axis, "trial/seed": "seed"}


@dataclass
class TrialOutcome:
    ident: str  # the trial's id in state.json and MLflow: '<row>/seed=<s>' (the row of an Optuna trial: its values)
    config: dict[str, Any]  # what lpt_trainable reads: {'row', 'seed'} or Optuna's sampled keys and 'seed'
    status: str  # complete | failed (NaN loss / out of memory: ended on purpose) | error | stopped (by ASHA, or
    #              ended without a result) | unfinished
    metrics: dict[str, Any]
    reason: str = ""


def _outcome(context: SweepContext, flat: dict[str, Any], metrics: dict[str, Any] | None,
             error: BaseException | str | None, terminal: bool) -> TrialOutcome:
    ident, metrics = context.trial_id(flat), unpacked(metrics or {})
    if error is not None:
        status, reason = "error", (str(error).strip().splitlines() or ["error"])[-1]
    elif metrics.get("trial_complete"):
        status, reason = "complete", ""
    elif metrics.get("trial_failed"):
        status, reason = ("failed" if terminal else "unfinished"), metrics["trial_failed"]
    else:
        status, reason = ("stopped" if terminal else "unfinished"), "no result"
    return TrialOutcome(ident, flat, status, metrics, reason)


def _outcomes(context: SweepContext, config: dict[str, Any], metrics: dict[str, Any] | None,
              error: BaseException | str | None, terminal: bool) -> list[TrialOutcome]:
    """One outcome per row: a fused trial's final result carries each row's own (FUSED_ROWS, by trial id); a
    fused trial that errored or did not finish gives each of its rows that status."""
    flat = tune_values(config)
    fused = context.fused_trials(flat)
    if fused is None:
        return [_outcome(context, flat, metrics, error, terminal)]
    rows = json.loads(metrics[FUSED_ROWS]) if metrics and FUSED_ROWS in metrics else {}
    return [_outcome(context, {"row": t.row, "seed": t.seed}, rows.get(t.trial_id), error, terminal) for t in fused]


def _fit(tuner: tune.Tuner, context: SweepContext) -> dict[str, TrialOutcome]:
    found = {}
    for result in tuner.fit():
        found.update((o.ident, o) for o in _outcomes(context, result.config, result.metrics, result.error, True))
    return found


def _saved_state(path: str, context: SweepContext) -> dict[str, TrialOutcome]:
    """The trials of a Tune run as its last experiment snapshot left them (what Tuner.restore will start from)."""
    found = {}
    for trial in ExperimentAnalysis(path).trials:
        terminal = trial.status in (Trial.TERMINATED, Trial.ERROR)
        error = "errored" if trial.status == Trial.ERROR else None
        found.update((o.ident, o) for o in _outcomes(context, trial.config, trial.last_result, error, terminal))
    return found


def tune_run_exists(storage: str, name: str) -> bool:
    """Whether a Tune run `name` was started in `storage` (a resume restores it as it was planned)."""
    return tune.Tuner.can_restore(f"{storage.rstrip('/')}/{name}")


def _runs(path: str) -> list[str]:
    """The Tune run at `path` and the reruns of its failed trials (path-rerun1, -rerun2, ...) that exist."""
    found = []
    while tune.Tuner.can_restore(candidate := path if not found else f"{path}-rerun{len(found)}"):
        found.append(candidate)
    return found


@dataclass
class TunerResult:
    records: list[dict]  # trials.json: one per trial that ran to its end
    failed: list[str]  # ids of the trials a resume runs again
    stopped: list[TrialOutcome]  # the trials ASHA stopped early: finished, not in the report's table


def _tune_environment() -> None:
    """Tune's concise progress table instead of its verbose new output engine; no warning when two experiment
    snapshots fall within 5 s (Tune snapshots every num_to_keep checkpoints of a trial: on the demo's seconds-long
    epochs that is every other epoch, a cheap local copy, and three lines of noise under the progress table each
    time; its warning about a slow (> 30 s) snapshot stays on); and none of Tune's own per-trial result files
    (CSV, JSON, TensorBoard: MLflow holds every metric, and at hundreds of trials those loggers' per-trial state is
    driver memory that grows with each trial). Read when a Tune run starts; a user's own setting wins."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    analysis = logging.getLogger("ray.tune.analysis.experiment_analysis")
    if os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1" and not any(
            isinstance(f, _NoResultFiles) for f in analysis.filters):
        analysis.addFilter(_NoResultFiles())


class _NoResultFiles(logging.Filter):
    """Tune's ResultGrid looks for each trial's result.json / progress.csv to build a per-trial DataFrame the sweep
    never reads (its outcomes come from each trial's last result); with Tune's file loggers off it would print a
    line per trial saying they are missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to fetch metrics for")


def run_tuner(plan: SweepPlan, context: SweepContext, storage: str, name: str,
              units: list[dict[str, Any]], log=print, callbacks: list[tune.Callback] | None = None) -> TunerResult:
    """Runs (or restores) one Tune run.

    On a resume, every Tune run of `name` is restored (unfinished and errored trials resumed, OptunaSearch's
    state kept). A trial that ended on purpose before this driver started (NaN loss, out of memory: Tune marks it
    TERMINATED, so its restore leaves it alone) runs again in a new Tune run `<name>-rerun<k>` on its own config:
    it continues from its newest checkpoint in the stage store and its MLflow run, like any resumed trial.
    callbacks: Tune callbacks of a new run (a restored run brings back its own).
    """
    _tune_environment()
    optuna_search = plan.optuna and name == "trials"
    early_stopping = plan.settings.scheduler == "asha" and name == "trials"
    if name == "upstream":
        context = dataclasses.replace(context, upstream_only=True)
    path = f"{storage.rstrip('/')}/{name}"
    runs = _runs(path)
    trainable = _trainable(plan, context)
    if not runs:
        tuner = tune.Tuner(trainable, param_space=_search_space(plan, units, optuna_search),
                           tune_config=_tune_config(plan, optuna_search, early_stopping),
                           run_config=_run_config(plan, storage, name, _columns(plan, optuna_search), callbacks or []))
        latest = _fit(tuner, context)
    else:
        before: dict[str, TrialOutcome] = {}
        for run in runs:
            before.update(_saved_state(run, context))
        latest = {}
        for run in runs:
            log(f"{name}: restoring the Tune run in {run}")
            latest.update(_fit(tune.Tuner.restore(run, trainable, resume_unfinished=True, resume_errored=True),
                               context))
        again = [latest[o.ident] for o in before.values()
                 if o.status == "failed" and latest[o.ident].status == "failed"]
        if again:
            rerun = f"{name}-rerun{len(runs)}"
            log(f"{name}: {len(again)} trial(s) that failed before run again from their last checkpoints "
                f"(Tune run {rerun}): {[o.ident for o in again]}")
            tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search([o.config for o in again])},
                               tune_config=_tune_config(plan, optuna_search=False, early_stopping=False),
                               run_config=_run_config(plan, storage, rerun, _columns(plan, optuna_search, "trial/"),
                                                         callbacks or []))
            latest.update(_fit(tuner, context))
    stopped = [o for o in latest.values() if o.status == "stopped" and early_stopping]
    failed = [o for o in latest.values() if o.status != "complete" and o not in stopped]
    if stopped:
        log(f"{name}: {len(stopped)} trial(s) stopped early by scheduler=asha (not in the report's table): "
            f"{[o.ident for o in stopped]}")
    for outcome in failed:
        log(f"{name}: trial {outcome.ident} failed: {outcome.reason}")
    return TunerResult([_record(plan, o, optuna_search) for o in latest.values() if o.status == "complete"],
                       [o.ident for o in failed], stopped)


def _record(plan: SweepPlan, outcome: TrialOutcome, optuna_search: bool) -> dict[str, Any]:
    """One line of trials.json."""
    metrics = outcome.metrics
    return {
        "trial_id": metrics["lpt_trial"], "row": metrics["row"], "seed": metrics["seed"],
        "stage": metrics["stage"], "stage_key": metrics["stage_key"], "run_id": metrics["run_id"],
        "config": {k: outcome.config[k] for k in plan.ablation.space} if optuna_search else {},
        "metrics": {k: v for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in TUNE_KEYS},
    }
