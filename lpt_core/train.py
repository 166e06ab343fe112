"""run_stage: one LPT stage (phase 1, phase 2 or joint) from a typed config to final metrics and a checkpoint.

Engine-agnostic by construction: reporting and checkpoint publishing go through `StageHooks`, so the same
function runs in a plain process (`python -m lpt_core.train`) and inside a Ray Tune trial. A run resumed from one
of its checkpoints continues bit-exactly on CPU: model, optimizer, samplers, RNG and epoch are all restored.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from lpt_core.metrics import (accuracy_report, match_histogram, match_stats, match_table, per_class_table,
                              prediction_table)
from lpt_core.backbone import create_backbone, normalization, weights_digest
from lpt_core.checkpoint import META_FILE, BackboneIdentity, CheckpointError, load_checkpoint, save_checkpoint, stage_of
from lpt_core.config import STAGES, LPTConfig, StageConfig, from_dict
from lpt_core.data import DatasetBundle, Normalization, build_dataset
from lpt_core.evaluate import EvalOutput, QueryFeatures, evaluate, feature_statistics, image_paths, train_queries
from lpt_core.model import LPTModel
from lpt_core.runtime import is_out_of_memory, release_cached_memory, resolve_device, seed_everything
from lpt_core.sampling import ClassAwareSampler, InstanceSampler, branches_for, steps_per_epoch
from lpt_core.schedule import build_optimizer, lr_at
from lpt_core.stages import stage_inputs
from lpt_core.step import StepLoss, train_step


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; raised at the end of the epoch in which it happened."""


class StageOutOfMemoryError(MemoryError):
    """The device ran out of memory during a stage; deterministic for a given batch size and device share."""


class StageHooks:
    """Where a runner plugs in reporting and checkpoint publishing; the defaults only print."""

    def log(self, message: str) -> None:
        print(message, flush=True)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        """Called after every epoch with a complete, verified checkpoint folder of that epoch."""


@dataclass
class StageResult:
    stage: str
    metrics: dict[str, float]  # final evaluation: acc, many/medium/few (both rules), matching and feature stats
    history: list[dict[str, float]]
    per_class: pa.Table
    match: pa.Table | None
    checkpoint_dir: Path
    extras: dict[str, Any] = field(default_factory=dict)  # resumed_after_epoch, trainable_params, backbone
    predictions: pa.Table | None = None  # one row per evaluated image (prediction_table): intervals


@dataclass
class Progress:
    """What a checkpoint saves besides the trained tensors, so that a resumed epoch draws what it would have."""

    optimizer: torch.optim.Optimizer
    samplers: dict[str, ClassAwareSampler | InstanceSampler]  # by branch: cb, ib


@dataclass
class StageSetup:
    model: LPTModel
    bundle: DatasetBundle
    identity: BackboneIdentity
    device: torch.device


def setup_stage(cfg: LPTConfig, stage: str, hooks: StageHooks) -> StageSetup:
    device = resolve_device(cfg.device)
    backbone = create_backbone(cfg.backbone)
    identity = BackboneIdentity(cfg.backbone.name, weights_digest(backbone), cfg.backbone.norm_eps)
    bundle = build_dataset(cfg.data, Normalization(*normalization(backbone)))
    model = LPTModel(backbone, bundle.num_classes, cfg.prompt).to(device)
    hooks.log(f"[{stage}] {bundle.name}: {len(bundle.train)} train / {len(bundle.test)} eval images, "
              f"{bundle.num_classes} classes, backbone {cfg.backbone.name} on {device}")
    return StageSetup(model, bundle, identity, device)


def _load_parts(model: LPTModel, stage: str, saved: dict[str, Any], source: str | Path, remedy: str) -> None:
    """Loads exactly the tensors a `stage` checkpoint holds; a missing one or another shape is refused by name."""
    expected = model.stage_state(stage)
    missing = [k for k in expected if k not in saved]
    if missing:
        raise CheckpointError(f"{source}: lacks {missing}, which a {stage} checkpoint holds; {remedy}")
    for name, tensor in expected.items():
        if saved[name].shape != tensor.shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(saved[name].shape)} in the checkpoint "
                                  f"but {list(tensor.shape)} in this model; {remedy}")
    model.load_state_dict({k: saved[k] for k in expected}, strict=False)


def init_from_phase1(setup: StageSetup, checkpoint: str | Path, hooks: StageHooks) -> None:
    """Phase 2 starts from phase 1's shared prompt and classifier (the pool keeps its fresh init)."""
    state, meta = load_checkpoint(checkpoint, setup.identity, setup.bundle.num_classes)
    _load_parts(setup.model, "phase1", state["model"], checkpoint,
                "init_from must be a phase-1 checkpoint trained with this run's prompt.length and prompt.shared")
    hooks.log(f"initialised from {stage_of(meta)} checkpoint {checkpoint} (epoch {meta.get('epoch')})")


def epoch_batches(samplers: dict[str, Any], branches: tuple[str, ...], steps: int, batch_size: int) -> list:
    return [samplers[b].next_batch(batch_size).tolist() for _ in range(steps) for b in branches]


def train_loader(bundle: DatasetBundle, batches: list, cfg: LPTConfig, device: torch.device) -> DataLoader:
    return DataLoader(bundle.train, batch_sampler=batches, num_workers=cfg.data.num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def _train_epoch(cfg: LPTConfig, stage: str, pcfg: StageConfig, setup: StageSetup, progress: Progress,
                 epoch: int) -> dict[str, float]:
    model, device = setup.model, setup.device
    loss = StepLoss.for_epoch(pcfg, setup.bundle.class_counts, epoch)
    branches = loss.branches
    steps = steps_per_epoch(len(setup.bundle.train), pcfg.batch_size, pcfg.steps_per_epoch)
    batches = epoch_batches(progress.samplers, branches, steps, pcfg.batch_size)
    model.train()
    loss_sum = torch.zeros((), device=device)
    start, total_steps = time.perf_counter(), pcfg.epochs * steps
    loader = iter(train_loader(setup.bundle, batches, cfg, device))
    forward = functools.partial(model, stage=stage)
    for step in range(steps):
        global_step = epoch * steps + step
        lr = lr_at(global_step, total_steps, pcfg.warmup_epochs * steps, pcfg.lr, pcfg.min_lr)
        for group in progress.optimizer.param_groups:
            group["lr"] = lr
        parts = [next(loader) for _ in branches]
        images = torch.cat([p[0] for p in parts]).to(device, non_blocking=True)
        labels = [p[1].to(device, non_blocking=True) for p in parts]
        loss_sum += train_step(forward, images, labels, loss, progress.optimizer, cfg.precision)
    elapsed = time.perf_counter() - start
    mean_loss = (loss_sum / steps).item()  # the only host sync of the epoch: also the NaN check
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"{stage} epoch {epoch}: training loss is {mean_loss} (lr {lr:.3g})")
    images_seen = steps * pcfg.batch_size * len(branches)
    return {"loss": mean_loss, "lr": lr, "epoch_time_s": elapsed, "train_images_per_s": images_seen / elapsed}


def evaluate_metrics(cfg: LPTConfig, stage: str, setup: StageSetup) -> tuple[dict[str, float], EvalOutput]:
    out = evaluate(setup.model, setup.bundle.test, stage, setup.device, cfg)
    return eval_metrics(cfg, setup.bundle, out), out


def eval_metrics(cfg: LPTConfig, bundle: DatasetBundle, out: EvalOutput) -> dict[str, float]:
    """Accuracies (overall, many/medium/few by both rules) and, where prompts are matched, matching statistics."""
    metrics = accuracy_report(out.preds, out.labels, bundle.class_counts)
    if out.topk_idx is not None:
        metrics.update(match_stats(out.labels, out.topk_idx, bundle.num_classes, cfg.prompt.pool_size))
    return metrics


def checkpoint_state(setup: StageSetup, stage: str, progress: Progress, epoch: int, history: list) -> dict[str, Any]:
    return {
        "model": setup.model.stage_state(stage),
        "optimizer": progress.optimizer.state_dict(),
        "optimizer_params": list(setup.model.trained_parameters(stage)),  # the names of its state's slots, in order
        "samplers": {name: s.state_dict() for name, s in progress.samplers.items()},
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if setup.device.type == "cuda" else []},
        "epoch": epoch,
        "history": history,
    }


def restore_progress(setup: StageSetup, progress: Progress, resume_from: str | Path, stage: str,
             hooks: StageHooks) -> tuple[int, list]:
    saved, meta = load_checkpoint(resume_from, setup.identity, setup.bundle.num_classes)
    if stage_of(meta) != stage:
        raise CheckpointError(f"{resume_from}: is a {stage_of(meta)} checkpoint; cannot resume {stage} from it "
                              f"(phase 2 starts from a phase-1 checkpoint with init_from)")
    remedy = (f"resume it with the config that wrote it ('config' in its {META_FILE}), or train this {stage} from "
              f"its first epoch: without resume_from, or in a sweep after removing {Path(resume_from).parent}")
    _load_parts(setup.model, stage, saved["model"], resume_from, remedy)
    _check_optimizer_fits(saved, setup.model.trained_parameters(stage), resume_from, remedy)
    progress.optimizer.load_state_dict(saved["optimizer"])
    for name, sampler in progress.samplers.items():
        sampler.load_state_dict(saved["samplers"][name])
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"] and setup.device.type == "cuda":
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    hooks.log(f"resumed from {resume_from} after epoch {saved['epoch']}")
    return saved["epoch"] + 1, list(saved["history"])


def _check_optimizer_fits(saved: dict[str, Any], trained: dict[str, torch.nn.Parameter], source: str | Path,
                          remedy: str) -> None:
    """The saved optimizer state must be over the parameters this stage trains, in the same order and shapes."""
    names = list(trained)
    saved_names = saved.get("optimizer_params")  # absent in checkpoints written before the names were recorded
    saved_count = sum(len(group["params"]) for group in saved["optimizer"]["param_groups"])
    if saved_count != len(names) or saved_names not in (None, names):
        over = saved_names if saved_names is not None else f"{saved_count} parameters"
        raise CheckpointError(f"{source}: its optimizer state is over {over}, this stage trains {names}; {remedy}")
    slots = saved["optimizer"]["state"]
    for index, (name, param) in enumerate(trained.items()):
        for key, value in slots.get(index, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(f"{source}: optimizer {key} of {name} has shape {list(value.shape)} in the "
                                      f"checkpoint but {list(param.shape)} in this model; {remedy}")


def run_stage(cfg: LPTConfig, stage: str, workdir: str | Path, hooks: StageHooks | None = None, *,
              init_from: str | Path | None = None, resume_from: str | Path | None = None,
              keep_checkpoints: int = 2) -> StageResult:
    """Trains one stage in `workdir` and returns its final evaluation.

    init_from: a phase-1 checkpoint (required for phase 2). resume_from: a checkpoint of this same stage.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
    if stage == "phase2" and init_from is None and resume_from is None:
        raise ValueError("phase2 needs init_from=<phase-1 checkpoint>")
    hooks = hooks or StageHooks()
    workdir = Path(workdir)
    pcfg = cfg.stage_config(stage)
    seed_everything(cfg.seed, cfg.threads)
    setup = setup_stage(cfg, stage, hooks)
    torch.manual_seed(cfg.seed)  # training randomness must not depend on what building the model consumed
    if init_from is not None and resume_from is None:
        init_from_phase1(setup, init_from, hooks)
    params = setup.model.set_trainable(stage)
    labels = setup.bundle.train_labels
    progress = Progress(build_optimizer(params, pcfg),
                         {"cb": ClassAwareSampler(labels, pcfg.images_per_class, cfg.seed),
                          "ib": InstanceSampler(len(labels), cfg.seed + 1)})
    start_epoch, history = (restore_progress(setup, progress, resume_from, stage, hooks) if resume_from else (0, []))
    meta = {"stage": stage, "backbone": vars(setup.identity), "num_classes": setup.bundle.num_classes,
            "config": stage_inputs(cfg, stage), "init_from": str(init_from) if init_from else None}
    metrics, ckpt_dir, out = {}, None, None
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, pcfg.epochs):
            metrics = {"epoch": epoch, **_train_epoch(cfg, stage, pcfg, setup, progress, epoch)}
            last = epoch == pcfg.epochs - 1
            if last or (epoch + 1) % cfg.eval.every_epochs == 0:
                eval_metrics, out = evaluate_metrics(cfg, stage, setup)
                metrics.update(eval_metrics)
            history.append(metrics)
            ckpt_dir = save_checkpoint(workdir / "checkpoints" / f"epoch_{epoch:04d}",
                                       checkpoint_state(setup, stage, progress, epoch, history),
                                       {**meta, "epoch": epoch})
            prune_checkpoints(workdir / "checkpoints", keep=keep_checkpoints)
            hooks.log(progress_line(stage, epoch, pcfg.epochs, metrics))
            hooks.on_epoch_end(epoch, metrics, ckpt_dir)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        release_cached_memory(setup.device)
        raise out_of_memory_error(err, cfg, stage, epoch, setup.device) from err
    if out is None:  # resumed after the last epoch: evaluate what the checkpoint holds
        ckpt_dir = Path(resume_from)
        eval_metrics, out = evaluate_metrics(cfg, stage, setup)
        metrics = {**(history[-1] if history else {}), **eval_metrics}
    result = finish_result(cfg, stage, setup, out, metrics, history, ckpt_dir)
    result.extras.update(resumed_after_epoch=start_epoch - 1 if resume_from else None,
                         trainable_params=sum(p.numel() for p in params), backbone=vars(setup.identity))
    return result


def out_of_memory_error(err: BaseException, cfg: LPTConfig, stage: str, epoch: int,
                   device: torch.device) -> StageOutOfMemoryError:
    """The allocator's words plus the knobs that decide the memory a stage needs."""
    pcfg = cfg.stage_config(stage)
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return StageOutOfMemoryError(
        f"{stage} epoch {epoch}: out of memory on {device} ({reason}); lower {stage}.batch_size (now "
        f"{pcfg.batch_size} per branch, {len(branches_for(pcfg.sampling))} branches a step) or "
        f"data.eval_batch_size (now {cfg.data.eval_batch_size}), or give each trial more of the device "
        f"(resources.gpu in a sweep)")


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keeps the newest `keep` epoch folders: the latest plus a fallback in case the latest is damaged."""
    for old in sorted(folder.glob("epoch_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def wants_feature_stats(cfg: LPTConfig, bundle: DatasetBundle) -> bool:
    return cfg.eval.feature_stats and bundle.train_eval is not None


def finish_result(cfg: LPTConfig, stage: str, setup: StageSetup, out: EvalOutput, metrics: dict, history: list,
                  ckpt_dir: Path, train: QueryFeatures | None = None) -> StageResult:
    """The stage's result from its final evaluation; `train`: the training split's query features where the caller
    has them already (fused rows compute them in one pass), else computed here if eval.feature_stats asks."""
    final, knn_preds = dict(metrics), None
    if wants_feature_stats(cfg, setup.bundle):
        stats, knn_preds = feature_statistics(train or train_queries(setup.model, setup.bundle, stage, setup.device,
                                                                     cfg), out, cfg)
        final.update(stats)
    per_class = per_class_table(out.preds, out.labels, setup.bundle.class_counts, setup.bundle.class_names)
    match = None
    if out.topk_idx is not None:
        hist = match_histogram(out.labels, out.topk_idx, setup.bundle.num_classes, cfg.prompt.pool_size)
        match = match_table(hist)
    predictions = prediction_table(out.preds, out.labels, setup.bundle.class_counts, out.topk_idx, knn_preds,
                                     image_paths(setup.bundle.test))
    return StageResult(stage, final, history, per_class, match, ckpt_dir, predictions=predictions)


def progress_line(stage: str, epoch: int, epochs: int, m: dict[str, float]) -> str:
    line = f"[{stage}] epoch {epoch + 1}/{epochs} loss {m['loss']:.4f} lr {m['lr']:.2e} " \
           f"{m['train_images_per_s']:.0f} img/s"
    if "acc" in m:
        line += f" | acc {m['acc']:.2f} many {m['many']:.2f} medium {m['medium']:.2f} few {m['few']:.2f}"
    return line


def main(argv: list[str] | None = None) -> None:
    """Plain-process runner: `python -m lpt_core.train --config cfg.json --stage phase1 --workdir DIR`."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", required=True, help="JSON file with the nested LPTConfig fields")
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--init-from", help="phase-1 checkpoint folder (phase 2)")
    parser.add_argument("--resume-from", help="checkpoint folder of this stage")
    args = parser.parse_args(argv)
    cfg = from_dict(json.loads(Path(args.config).read_text()))
    result = run_stage(cfg, args.stage, args.workdir, init_from=args.init_from, resume_from=args.resume_from)
    print(json.dumps({"stage": result.stage, "checkpoint": str(result.checkpoint_dir), **result.metrics}, indent=1))


if __name__ == "__main__":
    main()
