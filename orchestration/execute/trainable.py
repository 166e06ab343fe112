"""The Ray Tune function trainable: one trial = its chain of stages, each fetched from the stage store or trained.

Per epoch the final stage reports its metrics and checkpoint to Tune and its metrics to MLflow (idempotently).
A retried or restored trial resumes from the newest valid checkpoint it can find: the one Tune hands back or
the newer one in the stage store (Tune's experiment snapshot can lag behind the trial by a few epochs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import time
import traceback
from numbers import Number
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import torch
from ray import tune

from experiments.schema import DebugSettings
from lpt_core.checkpoint import CheckpointError, read_meta, stage_of, verify_checkpoint
from lpt_core.runtime import resolve_device
from lpt_core.fused import FusedRow, run_fused_stage
from lpt_core.train import NonFiniteLossError, StageHooks, StageOutOfMemoryError, run_stage
from orchestration.tracking.run_names import mlflow_metrics, stage_params, stage_run_name, trained_params
from orchestration.plan.trial_specs import BASE_ROW, SweepContext, TrialSpec, tune_values
from lpt_core.stages import StageSpec
from orchestration.execute.stage_store import StageOutput, StageStore
from orchestration.tracking.registry import MetricSpool, RunRegistry, is_outage, redact


FUSED_ROWS = "fused_rows"  # the key of a fused trial's final result that holds each row's own (JSON)
LPT_METRICS = "lpt_metrics"  # the key of a result that holds its numbers Tune does not read (JSON; tune_result)
TUNE_COLUMNS = ("acc", "few", "epoch")  # the numbers of Tune's progress table


def device_tag(device: torch.device, requested: str, log=print) -> str:
    """The trial's `lpt.device` tag. A trial that Ray gave a GPU but that trains on the CPU (no CUDA in this torch,
    no driver, or device=cpu) says so in its log and in the tag, instead of passing for a GPU run."""
    assigned = [str(gpu) for gpu in ray.get_gpu_ids()] if ray.is_initialized() else []
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if not assigned:
        return "cpu"
    gpus = ", ".join(assigned)
    if requested == "cpu":
        log(f"WARNING: Ray reserved GPU {gpus} for this trial but device=cpu: it trains on the CPU and the GPU "
            f"share stays idle (set resources.gpu=0 for CPU trials)")
        return f"cpu (device=cpu; Ray assigned GPU {gpus}, unused)"
    log(f"WARNING: Ray assigned GPU {gpus} to this trial but torch cannot use CUDA on {socket.gethostname()} "
        f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}, torch.cuda.is_available() "
        f"is False, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): it trains on the "
        f"CPU. Check the node's NVIDIA driver and torch build, or set resources.gpu=0 for CPU trials")
    return f"cpu (Ray assigned GPU {gpus}; CUDA unavailable)"


def tune_result(values: dict[str, Any], metric: str) -> dict[str, Any]:
    """A result as it goes to Tune: the ablation's metric (its searcher and scheduler read it), the progress table's
    numbers and the strings stay keys; every other number travels in one JSON string. Tune keeps a running analysis
    of each numeric key of each trial (max, min, three averages, two deques) in the driver's memory and in every
    experiment snapshot: a dozen metrics more made about 100 KB per trial at a thousand trials."""
    kept = {k: v for k, v in values.items() if k in TUNE_COLUMNS or k == metric or not isinstance(v, Number)}
    packed = {k: v for k, v in values.items() if k not in kept}
    return {**kept, LPT_METRICS: json.dumps(packed, default=float)}


def unpacked(result: dict[str, Any]) -> dict[str, Any]:
    """tune_result's inverse: every value of the result as its own key."""
    if LPT_METRICS not in result:
        return result
    return {**json.loads(result[LPT_METRICS]), **{k: v for k, v in result.items() if k != LPT_METRICS}}


class InjectedFault(RuntimeError):
    """Raised on purpose by debug.fail_at_epoch (fault-injection tests of retry and resume)."""


class UpstreamFailed(RuntimeError):
    """The phase 1 a trial starts from failed in the upstream Tune run: the trial ends failed without training."""


class TrialHooks(StageHooks):
    """Reports each epoch to MLflow (once per step) and, for the trial's final stage, to Tune with a checkpoint."""

    def __init__(self, spool: MetricSpool, run_id: str, spec: StageSpec, report_to_tune: bool,
                 debug: DebugSettings, store: StageStore, device: torch.device, trial: TrialSpec,
                 tune_checkpoint: bool = True, metric: str = "acc") -> None:
        self.spool, self.run_id, self.spec, self.debug, self.store = spool, run_id, spec, debug, store
        self.metric = metric
        self.report_to_tune, self.tune_checkpoint = report_to_tune, tune_checkpoint
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
            tune.report(tune_result(report, self.metric), checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir))
                        if self.tune_checkpoint else None)
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


def restored_checkpoint(checkpoint: tune.Checkpoint, work_dir: Path) -> Path:
    """Where the checkpoint Tune restored a trial with can be read: in place when Tune's storage is a filesystem of
    this node (the sweep folder, local or shared), else copied into the stage's work folder, one copy per stage.
    Not `to_directory()`'s default: a new folder under the node's /tmp per restore that nothing removes."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory(str(work_dir / "tune_restored")))


def _resume_point(store: StageStore, spec: StageSpec, log) -> Path | None:
    """Newest valid checkpoint among the stage store's and the one Tune restored (if it is of this stage)."""
    candidates = []
    local = store.latest_checkpoint(spec.key, log=log)
    if local is not None:
        candidates.append((read_meta(local)["epoch"], local))
    tune_checkpoint = tune.get_checkpoint()
    if tune_checkpoint is not None:
        restored = restored_checkpoint(tune_checkpoint, store.work_dir(spec.key))
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


def _open_run(context: SweepContext, trial: TrialSpec, spec: StageSpec, upstream: StageOutput | None,
              store: StageStore, tracking: Tracking, report_to_tune: bool, tune_checkpoint: bool = True
              ) -> tuple[str, TrialHooks]:
    """The stage's MLflow run (found again by a retry or a resume) and the hooks that report its epochs."""
    cfg = trial.config
    device = resolve_device(cfg.device)
    log = lambda message: print(f"[{spec.key}] {message}", flush=True)  # noqa: E731
    tags = {**_stage_tags(context, trial, spec, upstream), "lpt.device": device_tag(device, cfg.device, log)}
    run_id = tracking.runs.stage_run(context.parent_run_id, context.sweep, spec.key,
                                     _run_name(context, trial, spec), stage_params(cfg, spec.stage), tags)
    tracking.spool.load(run_id)  # what an earlier attempt of this run could not send goes first
    hooks = TrialHooks(tracking.spool, run_id, spec, report_to_tune, _faults_for(context.debug, trial.row), store,
                       device, trial, tune_checkpoint, context.metric)
    return run_id, hooks


def _fail_run(tracking: Tracking, run_id: str, err: BaseException) -> None:
    # redacted: an MLflow error quotes the URI it called, credentials and all
    tracking.runs.finish(run_id, failed=redact(f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"))


def train_tracked_stage(context: SweepContext, trial: TrialSpec, spec: StageSpec, upstream: StageOutput | None,
                        final: bool, store: StageStore, tracking: Tracking) -> StageOutput:
    log = lambda message: print(f"[{spec.key}] {message}", flush=True)  # noqa: E731
    with store.lock(spec.key):
        if store.is_done(spec.key, log=log):
            log(f"{spec.stage} reused from the stage store")
            return store.load(spec.key)
        run_id, hooks = _open_run(context, trial, spec, upstream, store, tracking, report_to_tune=final)
        try:
            result = run_stage(trial.config, spec.stage, store.work_dir(spec.key), hooks,
                               init_from=upstream.checkpoint_dir if upstream else None,
                               resume_from=_resume_point(store, spec, log))
        except InjectedFault:
            raise
        except Exception as err:
            _fail_run(tracking, run_id, err)
            raise
        output = store.finalize(spec.key, result, run_id, upstream=spec.upstream)
        _close_run(tracking, run_id, result.history, output, context, log)
        return output


def train_tracked_fused(context: SweepContext, trials: list[TrialSpec], upstream: StageOutput, store: StageStore,
                        tracking: Tracking) -> dict[str, StageOutput | BaseException]:
    """The phase 2 of several rows in one fused run (lpt_core.fused), each row with its own stage folder, MLflow
    run and checkpoints, exactly as if trained alone; rows the stage store already holds are reused. By trial id:
    the row's output, or the error that ended it alone (NaN loss)."""
    specs = {trial.trial_id: trial.chain[-1] for trial in trials}
    found: dict[str, StageOutput | BaseException] = {}
    with contextlib.ExitStack() as locks:
        for key in sorted({spec.key for spec in specs.values()}):  # one order for every trial: no deadlock
            locks.enter_context(store.lock(key))
        pending = []
        for trial in trials:
            spec = specs[trial.trial_id]
            log = lambda message, key=spec.key: print(f"[{key}] {message}", flush=True)  # noqa: E731
            if store.is_done(spec.key, log=log):
                log(f"{spec.stage} reused from the stage store")
                found[trial.trial_id] = store.load(spec.key)
                continue
            # the first row's epochs reach Tune (progress), without a checkpoint: each row's are in the stage store
            run_id, hooks = _open_run(context, trial, spec, upstream, store, tracking, report_to_tune=not pending,
                                      tune_checkpoint=False)
            row = FusedRow(trial.config, store.work_dir(spec.key), hooks, init_from=upstream.checkpoint_dir,
                           resume_from=_resume_point(store, spec, log))
            pending.append((trial, spec, run_id, row))
        if not pending:
            return found
        try:
            outcomes = run_fused_stage([row for _, _, _, row in pending])
        except InjectedFault:
            raise
        except Exception as err:
            for _, _, run_id, _ in pending:
                _fail_run(tracking, run_id, err)
            raise
        for (trial, spec, run_id, row), outcome in zip(pending, outcomes):
            if outcome.error is not None:
                tracking.runs.finish(run_id, failed=f"{type(outcome.error).__name__}: {outcome.error}")
                found[trial.trial_id] = outcome.error
                continue
            output = store.finalize(spec.key, outcome.result, run_id, upstream=spec.upstream)
            _close_run(tracking, run_id, outcome.result.history, output, context, row.hooks.log)
            found[trial.trial_id] = output
    return found


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


def _tracking(context: SweepContext) -> tuple[StageStore, Tracking]:
    store = StageStore(context.stage_root)
    runs = RunRegistry(context.tracking.uri, context.tracking.experiment,
                       outage_wait_s=context.tracking.flush_timeout_s)
    return store, Tracking(runs, MetricSpool(runs.client, store.root / "_mlflow_spool"))


def _summary(trial: TrialSpec, output: StageOutput, stage: str) -> dict[str, Any]:
    """A finished trial's final result: its metrics and where they come from (trials.json, the report)."""
    summary = {**output.metrics, "stage": stage, "stage_key": output.key, "run_id": str(output.run_id),
               "row": trial.row, "seed": trial.seed, "lpt_trial": trial.trial_id, "trial_complete": True}
    return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}


def _failure(trial: TrialSpec, err: BaseException) -> dict[str, Any]:
    """The final result of a trial that ended on purpose (NaN loss, out of memory)."""
    return {"trial_failed": f"{type(err).__name__}: {err}", "row": trial.row, "seed": trial.seed,
            "lpt_trial": trial.trial_id, "acc": float("nan")}


def lpt_trainable(config: dict[str, Any], context: SweepContext) -> None:
    """Tune entry point. config = {'trial': {'row', 'seed'}} or {'trial': {'rows', 'seed'}} (grid; 'rows': fused)
    or Optuna's sampled keys and 'seed'; context = the sweep-wide constants (bound with tune.with_parameters, kept
    out of every trial's config)."""
    # Tune logs "Checkpoint successfully created at ..." for every epoch of every trial: noise between the
    # progress lines; its warnings and errors still come through
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    values = tune_values(config)
    fused = context.fused_trials(values)
    if fused is not None:
        _fused_trial(context, fused)
        return
    trial = context.trial(values)
    if (reason := context.blocked_by(trial)) is not None:
        tune.report(_failure(trial, UpstreamFailed(reason)))
        return
    chain = trial.chain[:-1] if context.upstream_only and len(trial.chain) > 1 else trial.chain
    store, tracking = _tracking(context)
    output = None
    try:
        for i, spec in enumerate(chain):
            output = train_tracked_stage(context, trial, spec, output, i == len(chain) - 1, store, tracking)
    except (NonFiniteLossError, StageOutOfMemoryError) as err:
        # not raised: Tune would retry at once, and fail the same way. The trial ends TERMINATED with the reason;
        # a resume, after the cause is fixed, runs it again (tuning.run_tuner) from its last checkpoint
        tune.report(_failure(trial, err))
        return
    tune.report(tune_result(_summary(trial, output, chain[-1].stage), context.metric))


def _fused_trial(context: SweepContext, trials: list[TrialSpec]) -> None:
    """Rows fused by the plan (orchestration.plan.fusion): their shared phase 1 (from the stage store), then their
    phase 2 together. The final result holds each row's own, as JSON under FUSED_ROWS (Tune keeps a result's
    values flat); the driver splits it into one outcome per row."""
    store, tracking = _tracking(context)
    lead = trials[0]
    if (reason := context.blocked_by(lead)) is not None:
        rows = {trial.trial_id: _failure(trial, UpstreamFailed(reason)) for trial in trials}
        tune.report({FUSED_ROWS: json.dumps(rows, default=float), "trial_complete": False, "acc": float("nan")})
        return
    try:
        upstream = train_tracked_stage(context, lead, lead.chain[0], None, False, store, tracking)
        found = train_tracked_fused(context, trials, upstream, store, tracking)
    except (NonFiniteLossError, StageOutOfMemoryError) as err:  # their phase 1, or their shared memory: every row
        found = {trial.trial_id: err for trial in trials}
    rows = {trial.trial_id: (_failure(trial, found[trial.trial_id]) if isinstance(found[trial.trial_id], BaseException)
                             else _summary(trial, found[trial.trial_id], "phase2")) for trial in trials}
    complete = all(row.get("trial_complete") for row in rows.values())
    tune.report({FUSED_ROWS: json.dumps(rows, default=float), "trial_complete": complete,
                 "acc": _mean([row["acc"] for row in rows.values()])})


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")
