"""One Ray Tune run (the upstream stages, or the trials): search, scheduler, failure handling, restore.

A Tune run that already exists in the storage is restored (`Tuner.restore`, errored and unfinished trials
resumed), so OptunaSearch's state and the finished trials survive a dead driver; the trials themselves resume
from their newest checkpoint through the stage store.
"""
from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's concise CLIReporter table, not the verbose new engine

import optuna  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune import CLIReporter  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search import ConcurrencyLimiter  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from lpt_core.config import PHASES  # noqa: E402
from orchestration.plan import SweepPlan  # noqa: E402
from orchestration.trainable import lpt_trainable  # noqa: E402

TUNE_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore",
             "iterations_since_restore", "done", "epoch", "loss", "lr", "epoch_time_s", "train_images_per_s",
             "checkpoint_dir_name", "should_checkpoint", "trial_complete", "seed", "trial_id", "trial_failed"}
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}


def _trainable(plan: SweepPlan, context: dict[str, Any]):
    resources = plan.settings.resources
    trainable = tune.with_parameters(lpt_trainable, context=context)
    return tune.with_resources(trainable, {"cpu": resources.cpu, "gpu": resources.gpu})


def _search_space(plan: SweepPlan, rows: list[tuple[str | None, int]], optuna_search: bool) -> dict:
    if optuna_search:
        space = {}
        for key, dist in plan.ablation.space.items():
            if dist.integer:
                space[key] = tune.randint(int(dist.low), int(dist.high) + 1)
            else:
                space[key] = (tune.loguniform if dist.log else tune.uniform)(dist.low, dist.high)
        return {"seed": plan.settings.seeds[0], **space}
    return {"trial": tune.grid_search([{"row": r, "seed": s} for r, s in rows])}


def _tune_config(plan: SweepPlan, optuna_search: bool) -> tune.TuneConfig:
    search = plan.settings.search
    search_alg, num_samples = None, 1
    if optuna_search:
        searcher = OptunaSearch(sampler=SAMPLERS[search.sampler](seed=search.seed))
        search_alg, num_samples = ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent), search.num_samples
    epochs = max(plan.base_lpt[p]["epochs"] for p in PHASES)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1, grace_period=1)
                 if plan.settings.scheduler == "asha" else FIFOScheduler())
    return tune.TuneConfig(
        metric=plan.ablation.metric, mode=search.mode, search_alg=search_alg, scheduler=scheduler,
        num_samples=num_samples, max_concurrent_trials=plan.settings.max_concurrent_trials or None,
        reuse_actors=True,  # a new worker process per trial would re-import torch, timm and MLflow every time
        trial_name_creator=lambda t: f"trial_{t.trial_id}", trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
    )


def _reporter(plan: SweepPlan, optuna_search: bool) -> CLIReporter:
    params = ({k: k.split(".")[-1] for k in plan.ablation.space} if optuna_search
              else {"trial/row": plan.ablation.axis, "trial/seed": "seed"})
    return CLIReporter(metric_columns={"stage": "stage", "epoch": "epoch", "acc": "acc", "few": "few"},
                       parameter_columns=params, max_report_frequency=30, sort_by_metric=False)


def run_tuner(plan: SweepPlan, context: dict[str, Any], storage: str, name: str,
              rows: list[tuple[str | None, int]], log=print) -> tuple[list[dict], list[str]]:
    """Runs (or restores) one Tune run; returns (records of finished trials, ids of failed trials)."""
    optuna_search = plan.optuna and name == "trials"
    upstream = name == "upstream"
    if upstream:
        context = {**context, "upstream_only": True}
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        log(f"{name}: restoring the Tune run in {path}")
        tuner = tune.Tuner.restore(path, _trainable(plan, context), resume_unfinished=True, resume_errored=True)
    else:
        run_config = tune.RunConfig(
            name=name, storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=plan.settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            progress_reporter=_reporter(plan, optuna_search), verbose=1,
        )
        tuner = tune.Tuner(_trainable(plan, context), param_space=_search_space(plan, rows, optuna_search),
                           tune_config=_tune_config(plan, optuna_search), run_config=run_config)
    results = tuner.fit()
    records, failed = [], []
    for result in results:
        trial = result.config.get("trial", {})
        ident = ((result.metrics or {}).get("lpt_trial")
                 or (f"{trial.get('row')}/seed={trial.get('seed')}" if trial else str(result.path).rsplit("/", 1)[-1]))
        if result.error is not None or not (result.metrics or {}).get("trial_complete"):
            failed.append(ident)
            reason = (str(result.error).splitlines()[-1] if result.error
                      else (result.metrics or {}).get("trial_failed", "no result"))
            log(f"{name}: trial {ident} failed: {reason}")
            continue
        metrics = result.metrics
        records.append({
            "trial_id": metrics["lpt_trial"], "row": metrics["row"], "seed": metrics["seed"],
            "stage": metrics["stage"], "stage_key": metrics["stage_key"], "run_id": metrics["run_id"],
            "config": {k: result.config[k] for k in plan.ablation.space} if optuna_search else {},
            "metrics": {k: v for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in TUNE_KEYS},
        })
    return records, failed
