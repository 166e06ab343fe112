"""The sweep driver: folder, lock and guards, MLflow parent run, the two Tune runs, trials.json, the report.

Sweep folder (sweep.root/<name>/): plan.json (what is computed), state.json (complete or not), trials.json (one
record per finished trial), report.{md,csv} and plots, mlflow.db (default tracking store), tune/ (Tune storage
unless sweep.storage points elsewhere), .lock (held by the running driver).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from lpt_core.checkpoint import atomic_write_bytes
from orchestration.cluster import check_resources, connect
from orchestration.plan import SweepPlan, build_plan, resolve_backbones
from orchestration.report import build_report
from orchestration.stages import StageStore
from orchestration.tracking import Tracker, default_tracking_uri, redact
from orchestration.tuning import run_tuner


class SweepError(RuntimeError):
    """The sweep cannot start or continue as asked (locked, exists, no space, unwritable storage)."""


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())


@contextlib.contextmanager
def sweep_lock(folder: Path) -> Iterator[None]:
    """One driver per sweep name: a second one refuses instead of interleaving trials and state files."""
    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise SweepError(f"sweep folder {folder} is in use by {owner}; wait for it or pick another sweep.name")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _prepare_folder(plan: SweepPlan) -> Path:
    root = Path(plan.settings.sweep.root)
    folder = (root / plan.name).resolve()
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


def _check_existing(plan: SweepPlan, folder: Path, fingerprint: str) -> str:
    """'new', 'resume' or 'complete'; refuses to overwrite a different or unfinished sweep."""
    plan_file = folder / "plan.json"
    if not plan_file.exists():
        return "new"
    saved = json.loads(plan_file.read_text())
    if saved["fingerprint"] != fingerprint:
        raise SweepError(f"sweep {plan.name!r} in {folder} was started with a different configuration "
                         f"(fingerprint {saved['fingerprint']} vs {fingerprint}); nothing was changed. "
                         f"Use another sweep.name, or the original overrides to resume it")
    state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").exists() else {}
    if state.get("status") == "complete":
        return "complete"
    if not plan.settings.resume:
        raise SweepError(f"sweep {plan.name!r} in {folder} exists and is unfinished; pass resume=true to finish "
                         f"it, or sweep.name=<new name> to start another")
    return "resume"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _context(plan: SweepPlan, tracking_uri: str, parent_run_id: str) -> dict[str, Any]:
    """Sweep-wide constants every trial receives in its Tune config."""
    s = plan.settings
    return {
        "sweep": plan.name, "ablation": plan.ablation.name, "experiment": plan.experiment,
        "axis": plan.ablation.axis, "base_lpt": plan.base_lpt, "points": plan.points,
        "space_keys": sorted(plan.ablation.space) if plan.optuna else [],
        "cache": s.stages.cache, "stage_root": str(Path(s.stages.root).resolve()),
        "tracking_uri": tracking_uri, "tracking_experiment": s.tracking.experiment,
        "tracking_flush_timeout_s": s.tracking.flush_timeout_s,
        "parent_run_id": parent_run_id, "debug": vars(s.debug),
    }


def run_sweep(cfg: DictConfig | dict, log=print) -> int:
    plan = build_plan(cfg)
    fingerprint = plan.fingerprint()
    folder = _prepare_folder(plan)
    with sweep_lock(folder):
        status = _check_existing(plan, folder, fingerprint)
        if status == "complete":
            log(f"sweep {plan.name!r} is complete; nothing to train. Report:")
            log(build_report(folder, log_to_mlflow=False).markdown)
            return 0
        connect(plan.settings.cluster, log=log)  # before writing anything: an unreachable cluster changes nothing
        check_resources(plan.settings.resources.cpu, plan.settings.resources.gpu)
        resolve_backbones(plan, log)
        _write_json(folder / "plan.json", {"fingerprint": fingerprint, "name": plan.name,
                                           "ablation": plan.ablation.name, "experiment": plan.experiment,
                                           "axis": plan.ablation.axis, "rows": list(plan.points),
                                           "seeds": plan.settings.seeds, "search": plan.settings.search.name,
                                           "metric": plan.ablation.metric,
                                           "stage_root": str(Path(plan.settings.stages.root).resolve())})
        _write_json(folder / "state.json", {"status": "running"})
        tracking_uri = plan.settings.tracking.uri or default_tracking_uri(folder)
        tracker = Tracker(tracking_uri, plan.settings.tracking.experiment,
                          outage_wait_s=plan.settings.tracking.flush_timeout_s)
        upstream = plan.upstream_keys()
        parent = tracker.parent_run(plan.name, {
            "lpt.ablation": plan.ablation.name, "lpt.experiment": plan.experiment, "lpt.git_commit": _git_commit(),
            "lpt.search": plan.settings.search.name, "lpt.stage_keys": ",".join(sorted(upstream))[:5000],
            "lpt.tracking_uri": redact(tracking_uri)})
        context = _context(plan, tracking_uri, parent)
        storage = plan.settings.sweep.storage or str(folder / "tune")
        store = StageStore(plan.settings.stages.root)
        missing = {k: v for k, v in upstream.items() if not store.is_done(k, log=log)}
        if missing:
            log(f"upstream: {len(missing)} distinct stage(s) to train, {len(upstream) - len(missing)} cached")
            _, failed = run_tuner(plan, context, storage, "upstream", list(missing.values()), log)
            if failed:
                _write_json(folder / "state.json", {"status": "incomplete", "failed": failed})
                log(f"upstream stage(s) failed for {failed}; the trials on top of them were not started. "
                    f"Fix the cause and run again with resume=true")
                tracker.finish(parent, failed=f"upstream stage(s) failed: {failed}")
                return 1
        records, failed = run_tuner(plan, context, storage, "trials", plan.rows(), log)
        _write_json(folder / "trials.json", records)
        complete = not failed
        _write_json(folder / "state.json", {"status": "complete" if complete else "incomplete", "failed": failed})
        report = build_report(folder, tracking_uri=tracking_uri, parent_run_id=parent)
        log(report.markdown)
        log(f"MLflow: mlflow ui --backend-store-uri {redact(tracking_uri)} --host 127.0.0.1")
        tracker.finish(parent, failed=None if complete else f"{len(failed)} trial(s) failed: {failed}")
        if not complete:
            log(f"{len(failed)} trial(s) failed: {failed}. Fix the cause and run again with resume=true")
            return 1
        return 0
