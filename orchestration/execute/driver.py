"""The sweep driver: folder, lock and guards, MLflow parent run, the two Tune runs, trials.json, the report.

Sweep folder (sweep.root/<name>/): plan.json (what is computed: its fingerprint and, key by key, its content),
state.json (complete or not, the failed trials, those scheduler=asha stopped early), trials.json (one record per
finished trial), report.{md,csv} and plots, tune/ (Tune storage unless sweep.storage points elsewhere: `upstream`,
`trials` and the reruns of their failed trials, `trials-rerun1`, ...), .lock (held by the running driver). Beside
the sweep folders, in sweep.root: the default tracking store of every sweep (mlflow.db, artifacts in mlartifacts/).
"""
from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER
from omegaconf import DictConfig

from lpt_core.config import ConfigError
from lpt_core.files import FileLocked, atomic_write_bytes, file_lock
from lpt_core.stages import stages_changed_by
from orchestration.cluster.input_check import check_inputs
from orchestration.cluster.ray_connection import ClusterError, alive_nodes, check_resources, connect, trial_slots
from orchestration.plan.estimate import Estimate, estimate, plan_lines, wall_line
from orchestration.plan.fusion import FusionPlan, plan_fusion, shared_upstream
from orchestration.plan.sweep_plan import SweepPlan, build_plan
from orchestration.reporting.build import Report, build_report
from orchestration.plan.record import PLAN_FILE, PlanRecord, read_state
from orchestration.plan.trial_specs import trial_id
from orchestration.execute.stage_store import StageStore
from orchestration.cluster.storage_check import check_shared_storage
from orchestration.tracking.registry import RunRegistry, redact
from orchestration.tracking.single_writer import TrackingError, single_writer
from orchestration.tracking.store_check import check_store
from orchestration.execute.suite_progress import SuiteProgress
from orchestration.execute.tuning import TrialOutcome, run_tuner, tune_run_exists
from orchestration.reporting.suite_report import build_suite_report, write_suite_file
from orchestration.reporting.workbench import summarise_suite, summarise_sweep, ui_link, write_view


class SweepError(RuntimeError):
    """The sweep cannot start or continue as asked (locked, exists, no space, unwritable storage)."""


RESUME_AFTER_FAILURE = (
    "Each reason is above and in the lpt.error tag of its MLflow run. Fix the cause and run the same command "
    "with resume=true: the failed trials (and only they) run again, each from its last checkpoint, continuing its "
    "MLflow run. resources.*, max_concurrent_trials and debug.* may change for that; a change to what the trials "
    "compute (a batch size, a learning rate, ...) is refused, as it would change the results: run it under a new "
    "sweep.name, where the stage cache supplies every stage that does not depend on the change")


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())


@contextlib.contextmanager
def sweep_lock(folder: Path) -> Iterator[None]:
    """One driver per sweep name: a second one refuses instead of interleaving trials and state files."""
    try:
        with file_lock(folder / ".lock", wait=False):
            yield
    except FileLocked as err:
        raise SweepError(f"sweep folder {folder} is in use by {err.holder}; wait for it or pick another "
                         f"sweep.name") from None


def _prepare_folder(plan: SweepPlan) -> Path:
    root, folder = Path(plan.settings.sweep.root), plan.folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SweepError(f"sweep.root={str(root)!r}: cannot write the sweep folder {folder} ({err})") from err
    free_gb = shutil.disk_usage(folder).free / 2**30
    if free_gb < plan.settings.min_free_disk_gb:
        raise SweepError(f"only {free_gb:.2f} GiB free under {folder}; min_free_disk_gb="
                         f"{plan.settings.min_free_disk_gb:g}. Free space or point sweep.root elsewhere")
    return folder


_UNSET = object()
_ROW_KEY = re.compile(r"^rows\[(?P<row>.*?)\]\.(?P<key>.+)$")


def _show(value: Any) -> str:
    return "(unset)" if value is _UNSET else json.dumps(value, default=str)


def _changed_keys(saved: dict[str, Any], content: dict[str, Any]) -> list[str]:
    """The keys of plan.json's content that differ (a row added or dropped counts once, as ablation.values, not
    once per key of that row)."""
    moved_rows = set(saved.get("ablation.values", [])) ^ set(content.get("ablation.values", []))
    return [key for key in sorted(saved.keys() | content.keys())
            if saved.get(key, _UNSET) != content.get(key, _UNSET)
            and not ((row_key := _ROW_KEY.match(key)) and row_key["row"] in moved_rows)]


def _changes(saved: dict[str, Any], content: dict[str, Any], keys: list[str], limit: int = 12) -> list[str]:
    """'key old -> new' for each changed key."""
    lines = [f"{key} {_show(saved.get(key, _UNSET))} -> {_show(content.get(key, _UNSET))}" for key in keys]
    return lines if len(lines) <= limit else [*lines[:limit], f"and {len(lines) - limit} more"]


def _reused_stages(plan: SweepPlan, saved: dict[str, Any], changed: list[str]) -> str:
    """What a new sweep of the changed configuration takes from the stage cache (stages whose key is the same:
    none of its fields changed, nor those of the stage it starts from)."""
    if not plan.settings.stages.cache or saved.get("stages.cache") is False:
        return "every stage is trained again (stages.cache=false keeps each sweep's stages to itself)"
    touched = stages_changed_by((m["key"] if (m := _ROW_KEY.match(key)) else key) for key in changed)
    stages = plan.stage_names()
    reused = [stage for stage in stages if stage not in touched]
    if not reused:
        return "every stage is trained again (each depends on a changed key)"
    if len(reused) == len(stages):
        return ("every stage this sweep finished is taken from the stage cache, not trained again (no key a stage "
                "depends on changed)")
    return (f"the {' and '.join(reused)} stages this sweep finished are taken from the stage cache, not trained "
            f"again (the changed keys are not part of them)")


def _refuse_changed(plan: SweepPlan, folder: Path, saved: PlanRecord, fingerprint: str) -> SweepError:
    if saved.content is None:  # plan.json of an earlier version: only its fingerprint is known
        return SweepError(f"sweep {plan.name!r} in {folder} was started with a different configuration "
                          f"(fingerprint {saved.fingerprint} vs {fingerprint}); nothing was changed. "
                          f"Use another sweep.name, or the original overrides to resume it")
    content = plan.content()
    changed = _changed_keys(saved.content, content)
    root, number = folder.parent, 2
    while (root / f"{plan.name}-{number}").exists():
        number += 1
    return SweepError(
        f"sweep {plan.name!r} in {folder} was started with a different configuration: "
        f"{', '.join(_changes(saved.content, content, changed))}; "
        f"nothing was changed. To resume it, use its original values (resources.*, max_concurrent_trials and "
        f"debug.* may differ: they do not change results). To run the new configuration, start it under a new "
        f"name, e.g. sweep.name={plan.name}-{number}: {_reused_stages(plan, saved.content, changed)}")


@contextlib.contextmanager
def _removed_if_refused(folder: Path, created: bool) -> Iterator[None]:
    """A new sweep refused before it wrote its plan (a missing input, an unreachable cluster) leaves no folder
    behind: the folder this driver made holds nothing but its lock then."""
    try:
        yield
    except (ConfigError, ClusterError, SweepError, TrackingError):
        if created and not (folder / PLAN_FILE).exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _check_existing(plan: SweepPlan, folder: Path, record: PlanRecord) -> str:
    """'new', 'resume' or 'complete'; refuses to overwrite a different or unfinished sweep, or to track a resume
    into another store or experiment than its first runs (the sweep's runs would be split between the two)."""
    if not (folder / PLAN_FILE).exists():
        return "new"
    saved = PlanRecord.read(folder)
    if saved.fingerprint != record.fingerprint:
        raise _refuse_changed(plan, folder, saved, record.fingerprint)
    moved = saved.tracking_changes(record)
    if moved:
        raise SweepError(f"sweep {plan.name!r} in {folder} is tracked in another place: {', '.join(moved)}; "
                         f"nothing was changed. Its runs would be split between the two: give the original "
                         f"tracking.uri / tracking.experiment to resume it, or start a new sweep.name")
    if read_state(folder).get("status") == "complete":
        return "complete"
    if not plan.settings.resume:
        raise SweepError(f"sweep {plan.name!r} in {folder} exists and is unfinished; pass resume=true to finish "
                         f"it, or sweep.name=<new name> to start another")
    return "resume"


def _git_commit() -> dict[str, str]:
    """MLflow's own source-version tag (the runs table's Version column), where the code is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {MLFLOW_GIT_COMMIT: out.stdout.strip()} if out.returncode == 0 and out.stdout.strip() else {}


def _parent_run(runs: RunRegistry, plan: SweepPlan, record: PlanRecord, upstream: dict) -> str:
    """The sweep's parent run (found again by a resume), with what the sweep varies as its params."""
    parent = runs.parent_run(plan.name, {
        "lpt.ablation": plan.ablation.name, "lpt.experiment": plan.experiment, "lpt.search": plan.settings.search.name,
        "lpt.stage_keys": ",".join(sorted(upstream))[:5000], "lpt.tracking_uri": redact(plan.tracking_uri()),
        MLFLOW_SOURCE_NAME: "orchestration/sweep.py", MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_USER: getpass.getuser(),
        **_git_commit()})
    runs.log_params(parent, record.parent_params())
    return parent


def _summarise(runs: RunRegistry, parent: str, record: PlanRecord, report: Report, suite: bool, store_uri: str,
               log) -> None:
    """The parent run's summary, the view over every sweep of the experiment, and how to open it."""
    if suite:
        summarise_suite(runs, parent, report)
    else:
        summarise_sweep(runs, parent, record, report)
    write_view(runs)
    command, link = ui_link(redact(store_uri), runs.experiment_id)  # the store: the sweep's own server stops with it
    log(f"MLflow: this sweep beside every other of experiment {record.tracking_experiment!r}"
        + (f"; serve the store with\n    {command}\nand open " if command else ": ") + link)


def _close_stopped(runs: RunRegistry, stopped: list[TrialOutcome]) -> None:
    """The stage runs of the trials ASHA stopped: KILLED, with the reason. Done here, after the Tune run: a trial
    stopped in its report is ended by Tune at once, with no time to close its run itself."""
    for outcome in stopped:
        if "run_id" in outcome.metrics:  # a trial stopped before its first report has no run to close
            runs.finish(outcome.metrics["run_id"], stopped=f"stopped by the ASHA scheduler after "
                                                          f"{int(outcome.metrics['epoch']) + 1} epoch(s)")


def _announce(plan: SweepPlan, log) -> Estimate | None:
    """The plan and its compute, before anything is trained (a suite always; any sweep with dry_run=true)."""
    if plan.suite is None and not plan.settings.dry_run:
        return None
    store = StageStore(plan.settings.stages.root)
    found = estimate(plan, {key for key in plan.stage_keys() if store.marked_done(key)}, log)
    for line in plan_lines(plan, found):
        log(line)
    return found


def _report(plan: SweepPlan, folder: Path, tracking_uri: str, parent: str | None, log) -> Report:
    """The sweep's report (a suite's: its tables and claims), logged to the parent run where there is one."""
    store = plan.tracking_uri()  # tracking_uri may be the sweep's own server, gone once the sweep ends
    if plan.suite is not None:
        return build_suite_report(folder, tracking_uri, parent, log_to_mlflow=parent is not None, log=log, store=store)
    return build_report(folder, tracking_uri=tracking_uri, parent_run_id=parent, log_to_mlflow=parent is not None,
                        store=store)


def _failed_upstream(separate: dict[str, tuple[str, int]], failed: list[str]) -> dict[str, str]:
    """The upstream stages whose Tune run failed -> why (the trials on top of them end failed without training)."""
    return {key: f"its upstream stage {key} failed (trial {trial_id(row, seed)})"
            for key, (row, seed) in separate.items() if trial_id(row, seed) in failed}


def run_sweep(cfg: DictConfig | dict, log=print) -> int:
    plan = build_plan(cfg)
    record = plan.record()
    found = _announce(plan, log)
    if plan.settings.dry_run:
        log("dry_run=true: nothing was trained; no sweep folder, stage or run was written")
        return 0
    created = not plan.folder.exists()
    folder = _prepare_folder(plan)
    with sweep_lock(folder), _removed_if_refused(folder, created):
        status = _check_existing(plan, folder, record)
        check_store(plan.tracking_uri())  # a database store that refuses the driver (a wrong password) stops it here
        if status == "complete":
            log(f"sweep {plan.name!r} is complete; nothing to train. Report:")
            log(_report(plan, folder, plan.tracking_uri(), None, log).markdown)
            return 0
        connect(plan.settings.cluster, log=log)  # before writing anything: an unreachable cluster changes nothing
        check_resources(plan.settings.resources.cpu, plan.settings.resources.gpu)
        check_inputs(plan, log=log)
        storage = plan.settings.sweep.storage or str(folder / "tune")
        slots = trial_slots(plan.settings.resources.cpu, plan.settings.resources.gpu,
                            plan.settings.max_concurrent_trials)
        fusion = plan_fusion(plan, slots)
        if found is not None and not found.failure:
            log(wall_line(found, slots))
        if tune_run_exists(storage, "trials"):
            log("fusion: as planned when the trials' Tune run started (it is restored with its trials)")
        else:
            for line in fusion.summary:
                log(line)
        check_shared_storage({"sweep.root": folder, "stages.root": plan.settings.stages.root}, log=log)
        plan.ensure_backbones(log)
        tracking = plan.settings.tracking
        with single_writer(plan.tracking_uri(), tracking.server, tracking.server_port, len(alive_nodes()),
                           plan.artifact_root(), folder, plan.name, log) as tracking_uri:
            record.write(folder)
            if plan.suite is not None:
                write_suite_file(folder, plan.suite.name, plan.aliases)
            _write_json(folder / "state.json", {"status": "running"})
            return _train(plan, record, folder, storage, fusion, found, tracking_uri, log)


def _train(plan: SweepPlan, record: PlanRecord, folder: Path, storage: str, fusion: FusionPlan,
           found: Estimate | None, tracking_uri: str, log) -> int:
    """The parent run, the upstream and trials Tune runs, trials.json, state.json, the report and the summary;
    tracking_uri is what the driver and the trials write to (the store, or the sweep's server over it)."""
    runs = RunRegistry(tracking_uri, record.tracking_experiment,
                       outage_wait_s=plan.settings.tracking.flush_timeout_s, artifacts=plan.artifact_root())
    upstream = plan.upstream_keys()
    parent = _parent_run(runs, plan, record, upstream)
    context = plan.context(tracking_uri, parent)
    store = StageStore(plan.settings.stages.root)
    missing = {k: v for k, v in upstream.items() if not store.is_done(k, log=log)}
    separate = shared_upstream(plan, fusion.units, missing)
    if missing:
        alone = len(missing) - len(separate)
        log(f"upstream: {len(missing)} distinct stage(s) to train, {len(upstream) - len(missing)} cached"
            + (f"; {alone} of them needed by one trial each, trained in that trial" if alone else ""))
    seconds = found.seconds if found is not None and not found.failure else {}
    callbacks = [SuiteProgress(plan, plan.suite, seconds)] if plan.suite is not None else []
    if separate:
        units = [{"row": row, "seed": seed} for row, seed in separate.values()]
        failed = run_tuner(plan, context, storage, "upstream", units, log, callbacks).failed
        context = dataclasses.replace(context, failed_upstream=_failed_upstream(separate, failed))
        # a plain sweep stops here when nothing else can run; a suite's trials end failed one by one, so that its
        # report says which tables lack what
        if failed and plan.suite is None and all(context.blocked_by(plan.trials[trial_id(row, unit.seed)])
                                                 for unit in fusion.units for row in unit.rows):
            _write_json(folder / "state.json", {"status": "incomplete", "failed": failed})
            log(f"upstream stage(s) failed for {failed}; the trials on top of them were not started. "
                f"{RESUME_AFTER_FAILURE}")
            runs.finish(parent, failed=f"upstream stage(s) failed: {failed}")
            return 1
        if failed:
            log(f"upstream stage(s) failed for {failed}: the trials on top of them end failed, the others run")
    result = run_tuner(plan, context, storage, "trials", [unit.tune_config() for unit in fusion.units], log,
                       callbacks)
    _write_json(folder / "trials.json", result.records)
    failed, complete = result.failed, not result.failed
    _close_stopped(runs, result.stopped)
    _write_json(folder / "state.json", {"status": "complete" if complete else "incomplete", "failed": failed,
                                        "stopped": [o.ident for o in result.stopped]})
    report = _report(plan, folder, tracking_uri, parent, log)
    log(report.markdown)
    _summarise(runs, parent, record, report, plan.suite is not None, plan.tracking_uri(), log)
    runs.finish(parent, failed=None if complete else f"{len(failed)} trial(s) failed: {failed}")
    if not complete:
        log(f"{len(failed)} trial(s) failed: {failed}. {RESUME_AFTER_FAILURE}")
        return 1
    return 0
