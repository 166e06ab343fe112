"""The Ray Tune function trainable: one trial = its chain of stages, each fetched from the stage store or trained.

Per epoch the final stage reports its metrics and checkpoint to Tune and its metrics to MLflow (idempotently).
A retried or restored trial resumes from the newest valid checkpoint it can find: the one Tune hands back or
the newer one in the stage store (Tune's experiment snapshot can lag behind the trial by a few epochs).
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from ray import tune

from experiments.schema import DebugSettings
from lpt_core.checkpoint import CheckpointError, read_meta, stage_of, verify_checkpoint
from lpt_core.runtime import resolve_device
from lpt_core.train import NonFiniteLossError, StageHooks, StageOutOfMemoryError, run_stage
from orchestration.cluster.ray_connection import device_tag
from orchestration.tracking.run_names import mlflow_metrics, stage_params, stage_run_name, trained_params
from orchestration.plan.trial_specs import BASE_ROW, SweepContext, TrialSpec, tune_values
from lpt_core.stages import StageSpec
from orchestration.execute.stage_store import StageOutput, StageStore
from orchestration.tracking.registry import MetricSpool, RunRegistry, is_outage, redact


class InjectedFault(RuntimeError):
    """Raised on purpose by debug.fail_at_epoch (fault-injection tests of retry and resume)."""


class TrialHooks(StageHooks):
    """Reports each epoch to MLflow (once per step) and, for the trial's final stage, to Tune with a checkpoint."""

    def __init__(self, spool: MetricSpool, run_id: str, spec: StageSpec, report_to_tune: bool,
                 debug: DebugSettings, store: StageStore, device: torch.device, trial: TrialSpec) -> None:
        self.spool, self.run_id, self.spec = spool, run_id, spec
        self.report_to_tune, self.debug, self.store = report_to_tune, debug, store
        self.last_eval: dict[str, float] = {"acc": float("nan"), "few": float("nan")}
        self.device, self.trial = device, trial

    def log(self, message: str) -> None:
        print(f"[{self.spec.key}] {message}", flush=True)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        self.spool.log_epoch(self.run_id, epoch, mlflow_metrics(metrics))
        if "acc" in metrics:
            self.last_eval = {k: v for k, v in metrics.items() if k not in ("loss", "lr")}
        if self.report_to_tune:
            report = {**self.last_eval, **metrics, "stage": self.spec.stage, "stage_key": self.spec.key,
                      "run_id": self.run_id}  # a trial ASHA stops ends here: the driver closes this run
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
        self._signal(epoch)
        self._maybe_fail(epoch)

    def _signal(self, epoch: int) -> None:
        """Tests act on these events instead of guessing with sleeps: one file per finished epoch, and, where
        asked, a hold until the test writes `release` (e.g. after it has killed the driver or a node)."""
        event_dir = self.debug.event_dir
        if not event_dir:
            return
        folder = Path(event_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / event_name(self.spec.stage, self.trial.row, self.trial.seed, epoch)).write_text(self.spec.key)
        if self.debug.hold_at_epoch == epoch and self.debug.fail_stage == self.spec.stage:
            while not (folder / "release").exists():
                time.sleep(0.05)

    def _maybe_fail(self, epoch: int) -> None:
        debug = self.debug
        if debug.epoch_sleep_s:
            time.sleep(debug.epoch_sleep_s)
        if debug.oom_at_epoch == epoch and debug.fail_stage == self.spec.stage:
            torch.empty(1 << 62, dtype=torch.uint8, device=self.device)  # 4 EiB: the allocator itself refuses
        if debug.fail_at_epoch != epoch or debug.fail_stage != self.spec.stage:
            return
        marker = self.store.folder(self.spec.key) / "injected_failures"
        count = int(marker.read_text()) if marker.exists() else 0
        if count < debug.fail_times:
            marker.write_text(str(count + 1))
            raise InjectedFault(f"debug.fail_at_epoch={epoch}: injected failure {count + 1}/{debug.fail_times}")


def event_name(stage: str, row: str, seed: int, epoch: int) -> str:
    """The file a trial writes into debug.event_dir after an epoch (row labels made safe as file names)."""
    safe_row = re.sub(r"[^A-Za-z0-9_.=-]", "_", row)
    return f"{stage}.{safe_row}.seed{seed}.epoch{epoch}"


def _faults_for(debug: DebugSettings, row: str) -> DebugSettings:
    """The injected faults (and the hold) of debug.* apply to every trial, or to debug.fail_row's trials alone."""
    if debug.fail_row is None or str(debug.fail_row) == row:
        return debug
    return dataclasses.replace(debug, fail_at_epoch=None, oom_at_epoch=None, hold_at_epoch=None)


def _resume_point(store: StageStore, spec: StageSpec, log) -> Path | None:
    """Newest valid checkpoint among the stage store's and the one Tune restored (if it is of this stage)."""
    candidates = []
    local = store.latest_checkpoint(spec.key, log=log)
    if local is not None:
        candidates.append((read_meta(local)["epoch"], local))
    tune_checkpoint = tune.get_checkpoint()
    if tune_checkpoint is not None:
        restored = Path(tune_checkpoint.to_directory())
        try:
            meta = verify_checkpoint(restored)
            if stage_of(meta) == spec.stage and restored.exists():
                candidates.append((meta["epoch"], restored))
        except CheckpointError as err:
            log(f"ignoring Tune's checkpoint: {err}")
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def _stage_tags(context: SweepContext, trial: TrialSpec, spec: StageSpec, upstream: StageOutput | None) -> dict:
    tags = {"lpt.stage": spec.stage, "lpt.row": trial.row, "lpt.seed": str(trial.seed),
            "lpt.ablation": context.ablation, "lpt.experiment": context.experiment, "lpt.axis": context.axis}
    if upstream is not None:
        tags.update({"lpt.upstream_key": upstream.key, "lpt.upstream_run_id": str(upstream.run_id)})
    return tags


def _run_name(context: SweepContext, trial: TrialSpec, spec: StageSpec) -> str:
    """The stage run's name, with the rows whose trials run this stage (a shared phase 1 names them all)."""
    if context.space:  # a search: its upstream serves every sampled trial; a sampled row names its own values
        return stage_run_name(spec.stage, None, [] if trial.row == BASE_ROW else [trial.row], trial.seed)
    rows = [t.row for t in context.trials.values() if spec in t.chain]
    return stage_run_name(spec.stage, context.axis, list(dict.fromkeys(rows)), trial.seed)


@dataclasses.dataclass
class Tracking:
    """A trial's way to MLflow: its runs, and the spool its epoch metrics wait in during an outage."""

    runs: RunRegistry
    spool: MetricSpool


def train_tracked_stage(context: SweepContext, trial: TrialSpec, spec: StageSpec, upstream: StageOutput | None,
              final: bool, store: StageStore, tracking: Tracking) -> StageOutput:
    log = lambda message: print(f"[{spec.key}] {message}", flush=True)  # noqa: E731
    with store.lock(spec.key):
        if store.is_done(spec.key, log=log):
            log(f"{spec.stage} reused from the stage store")
            return store.load(spec.key)
        cfg = trial.config
        device = resolve_device(cfg.device)
        tags = {**_stage_tags(context, trial, spec, upstream), "lpt.device": device_tag(device, cfg.device, log)}
        run_id = tracking.runs.stage_run(context.parent_run_id, context.sweep, spec.key,
                                         _run_name(context, trial, spec), stage_params(cfg, spec.stage), tags)
        tracking.spool.load(run_id)  # what an earlier attempt of this run could not send goes first
        hooks = TrialHooks(tracking.spool, run_id, spec, final, _faults_for(context.debug, trial.row), store,
                           device, trial)
        try:
            result = run_stage(cfg, spec.stage, store.work_dir(spec.key), hooks,
                               init_from=upstream.checkpoint_dir if upstream else None,
                               resume_from=_resume_point(store, spec, log))
        except InjectedFault:
            raise
        except Exception as err:
            tracking.runs.finish(run_id, failed=f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}")
            raise
        output = store.finalize(spec.key, result, run_id, upstream=spec.upstream)
        _close_run(tracking, run_id, result.history, output, context, log)
        return output


def _close_run(tracking: Tracking, run_id: str, history: list, output: StageOutput, context: SweepContext,
               log) -> None:
    """Final statistics, artifacts, status. A tracking outage that outlives the flush timeout does not fail a
    trained stage: what was not logged stays in the spool folder, and the message says where."""
    runs, spool = tracking.runs, tracking.spool
    if not spool.flush(timeout_s=context.tracking.flush_timeout_s):
        log(f"MLflow at {redact(runs.uri)} unreachable: epochs {[s for _, s in spool.unlogged()]} of run "
            f"{run_id} not logged; kept in {spool.folder}. Send them later with "
            f"`lpt-replay-metrics {spool.folder} --uri <tracking uri>`")
        return
    try:
        runs.log_final(run_id, len(history), mlflow_metrics(output.metrics))
        runs.log_params(run_id, trained_params(output.extras))
        runs.log_artifacts(run_id, [output.checkpoint_dir, *[p for p in output.files.values() if p.exists()]])
        runs.finish(run_id)
    except Exception as err:
        if not is_outage(err):
            raise
        log(f"MLflow at {redact(runs.uri)} unreachable at the end of run {run_id}: final statistics and "
            f"artifacts not logged ({err}); they are in {output.checkpoint_dir.parent}")


def lpt_trainable(config: dict[str, Any], context: SweepContext) -> None:
    """Tune entry point. config = {'trial': {'row', 'seed'}} (grid) or Optuna's sampled keys and 'seed';
    context = the sweep-wide constants (bound with tune.with_parameters, kept out of every trial's config)."""
    # Tune logs "Checkpoint successfully created at ..." for every epoch of every trial: noise between the
    # progress lines; its warnings and errors still come through
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    trial = context.trial(tune_values(config))
    chain = trial.chain[:-1] if context.upstream_only and len(trial.chain) > 1 else trial.chain
    store = StageStore(context.stage_root)
    runs = RunRegistry(context.tracking.uri, context.tracking.experiment,
                       outage_wait_s=context.tracking.flush_timeout_s)
    tracking = Tracking(runs, MetricSpool(runs.client, store.root / "_mlflow_spool"))
    output = None
    try:
        for i, spec in enumerate(chain):
            output = train_tracked_stage(context, trial, spec, output, i == len(chain) - 1, store, tracking)
    except (NonFiniteLossError, StageOutOfMemoryError) as err:
        # not raised: Tune would retry at once, and fail the same way. The trial ends TERMINATED with the reason;
        # a resume, after the cause is fixed, runs it again (tuning.run_tuner) from its last checkpoint
        tune.report({"trial_failed": f"{type(err).__name__}: {err}", "row": trial.row, "seed": trial.seed,
                     "lpt_trial": trial.trial_id, "acc": float("nan")})
        return
    summary = {**output.metrics, "stage": chain[-1].stage, "stage_key": output.key, "run_id": str(output.run_id),
               "row": trial.row, "seed": trial.seed, "lpt_trial": trial.trial_id, "trial_complete": True}
    tune.report({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
