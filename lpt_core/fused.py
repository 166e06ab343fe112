"""Fused phase 2: rows that start from one phase 1 and draw the same batches train in one process, batch by batch.

Most of the paper's ablations change phase 2 alone (m, top-k, ensemble, query function, the loss knobs): their
rows start from the same phase-1 checkpoint, and rows with the same seed and data stream (`fusion_key`) see the
same images in the same order. `run_fused_stage` trains such rows together: per batch, the embedding, blocks
1..K and the frozen query pass run once (`shared_phase2_pass`); each row then matches, selects and runs blocks
K+1..L with its own pool, through its own head, loss and optimizer.

Each row is the row `run_stage` would train alone, to the float rounding of a larger matrix product: the same
initial pool (built from the same random state), the same batches, its own sampler, optimizer, LR schedule and
checkpoints (the same format, so either runner resumes the other's), and its own random draws (A-GCL's noise,
dropout: every row's classifier and loss start from the random state that follows the batch, as they would
alone). A row whose loss turns NaN fails alone at the end of its epoch; the others go on. Resumed rows may stand
at different epochs (a fused run killed while saving): each epoch trains the rows that stand at it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from lpt_core.backbone import create_backbone, normalization, weights_digest
from lpt_core.checkpoint import BackboneIdentity, save_checkpoint
from lpt_core.config import LPTConfig
from lpt_core.data import Normalization, build_dataset
from lpt_core.evaluate import EvalOutput, evaluate_rows, train_queries_of_rows
from lpt_core.model import LPTModel, shared_phase2_pass
from lpt_core.runtime import autocast, is_out_of_memory, release_cached_memory, resolve_device, seed_everything
from lpt_core.sampling import ClassAwareSampler, InstanceSampler, steps_per_epoch
from lpt_core.schedule import build_optimizer, lr_at
from lpt_core.stages import fusion_key, stage_inputs
from lpt_core.step import StepLoss
from lpt_core.train import (NonFiniteLossError, Progress, StageHooks, StageOutOfMemoryError, StageResult,
                            StageSetup, checkpoint_state, epoch_batches, eval_metrics, finish_result, init_from_phase1,
                            out_of_memory_error, progress_line, prune_checkpoints, restore_progress, train_loader,
                            wants_feature_stats)

STAGE = "phase2"
RandomState = tuple[torch.Tensor, list[torch.Tensor]]  # torch's CPU generator state, and each CUDA device's


def _random_state(device: torch.device) -> RandomState:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else []


def _set_random_state(state: RandomState) -> None:
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])


def _same_state(a: RandomState, b: RandomState) -> bool:
    return torch.equal(a[0], b[0]) and len(a[1]) == len(b[1]) and all(map(torch.equal, a[1], b[1]))


@dataclass
class FusedRow:
    """One row of a fused run: what `run_stage(cfg, 'phase2', workdir, hooks, init_from=..., resume_from=...)`
    would receive."""

    cfg: LPTConfig
    workdir: Path
    hooks: StageHooks = field(default_factory=StageHooks)
    init_from: str | Path | None = None
    resume_from: str | Path | None = None


@dataclass
class RowOutcome:
    """A row's StageResult, or the error that ended it alone (NaN loss)."""

    result: StageResult | None = None
    error: BaseException | None = None


@dataclass
class _RowRun:
    row: FusedRow
    setup: StageSetup
    progress: Progress
    params: list[torch.nn.Parameter]
    next_epoch: int
    history: list[dict[str, float]]
    first_epoch: int
    rng: RandomState  # the random state this row's next epoch starts from
    meta: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint_dir: Path | None = None
    out: EvalOutput | None = None
    error: BaseException | None = None

    @property
    def cfg(self) -> LPTConfig:
        return self.row.cfg


def check_fusable(configs: Sequence[LPTConfig]) -> None:
    """Rows fuse only when they share the phase 1 they start from and every field that decides their batches."""
    keys = {fusion_key(cfg) for cfg in configs}
    if len(keys) > 1:
        raise ValueError(f"rows with different fusion keys {sorted(keys)} cannot train fused: they differ in their "
                         f"phase 1, seed or data stream (lpt_core.stages.FUSION_FIELDS)")


def _start_rows(rows: Sequence[FusedRow]) -> list[_RowRun]:
    """Every row's model, optimizer and samplers, built from the random states `run_stage` builds them from."""
    cfg = rows[0].cfg
    seed_everything(cfg.seed, cfg.threads)
    device = resolve_device(cfg.device)
    backbone = create_backbone(cfg.backbone)  # one frozen backbone for all rows
    identity = BackboneIdentity(cfg.backbone.name, weights_digest(backbone), cfg.backbone.norm_eps)
    bundle = build_dataset(cfg.data, Normalization(*normalization(backbone)))
    built = torch.get_rng_state()  # what each row's pool is initialised from, as if it were built alone
    runs = []
    for row in rows:
        if row.init_from is None and row.resume_from is None:
            raise ValueError(f"{row.workdir}: phase2 needs init_from=<phase-1 checkpoint>")
        torch.set_rng_state(built)
        setup = StageSetup(LPTModel(backbone, bundle.num_classes, row.cfg.prompt).to(device), bundle, identity, device)
        torch.manual_seed(row.cfg.seed)
        if row.init_from is not None and row.resume_from is None:
            init_from_phase1(setup, row.init_from, row.hooks)
        params = setup.model.set_trainable(STAGE)
        pcfg, labels = row.cfg.stage_config(STAGE), bundle.train_labels
        progress = Progress(build_optimizer(params, pcfg),
                            {"cb": ClassAwareSampler(labels, pcfg.images_per_class, row.cfg.seed),
                             "ib": InstanceSampler(len(labels), row.cfg.seed + 1)})
        start, history = (restore_progress(setup, progress, row.resume_from, STAGE, row.hooks) if row.resume_from
                          else (0, []))
        meta = {"stage": STAGE, "backbone": vars(identity), "num_classes": bundle.num_classes,
                "config": stage_inputs(row.cfg, STAGE), "init_from": str(row.init_from) if row.init_from else None}
        runs.append(_RowRun(row, setup, progress, params, start, history, start, _random_state(device), meta))
    _check_one_phase1([run.setup.model for run in runs], [row.workdir for row in rows])
    for row in rows:
        row.hooks.log(f"[{STAGE}] {bundle.name}: {len(bundle.train)} train / {len(bundle.test)} eval images, "
                      f"{bundle.num_classes} classes, backbone {cfg.backbone.name} on {device}; {len(rows)} rows "
                      f"fused: one backbone forward and query pass per batch for all")
    return runs


def _check_one_phase1(models: list[LPTModel], workdirs: list[Path]) -> None:
    """The shared pass runs the first row's shared prompt u for every row: each row must start from the same u."""
    lead = models[0].shared_prompt
    for model, workdir in zip(models[1:], workdirs[1:]):
        ours = model.shared_prompt
        if (lead is None) != (ours is None) or (lead is not None and not torch.equal(lead.tokens, ours.tokens)):
            raise ValueError(f"{workdir}: its shared prompt differs from {workdirs[0]}'s; fused rows must start "
                             f"from one phase-1 checkpoint")


def fused_train_step(models: Sequence[LPTModel], images: torch.Tensor, labels: Sequence[torch.Tensor],
                     losses: Sequence[StepLoss], optimizers: Sequence[torch.optim.Optimizer],
                     precision: str) -> list[torch.Tensor]:
    """`lpt_core.step.train_step` of every row over one batch: the shared pass once, then each row's classifier
    and loss from the random state that follows the batch (dropout and A-GCL's noise draw what the row alone would
    draw), one backward for all (rows share no trained tensor: each gets the gradient of its own loss), each row's
    optimizer step. Returns each row's loss, detached."""
    device = images.device
    after_batch = _random_state(device)
    with autocast(device, precision):
        features = shared_phase2_pass(models, images)
    values = []
    for model, row_features, loss in zip(models, features, losses):
        _set_random_state(after_batch)
        with autocast(device, precision):
            logits = model.classify(row_features.feature)
        values.append(loss(row_features.output(logits), labels))
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    torch.stack(values).sum().backward()
    for optimizer in optimizers:
        optimizer.step()
    return [value.detach() for value in values]


def _train_epoch(runs: list[_RowRun], epoch: int) -> None:
    """One epoch of the rows that stand at `epoch` (same batches, same random state: checked)."""
    lead = runs[0]
    cfg, bundle, device = lead.cfg, lead.setup.bundle, lead.setup.device
    pcfgs = [r.cfg.stage_config(STAGE) for r in runs]
    losses = [StepLoss.for_epoch(p, bundle.class_counts, epoch) for p in pcfgs]
    branches, batch_size = losses[0].branches, pcfgs[0].batch_size
    steps = steps_per_epoch(len(bundle.train), batch_size, pcfgs[0].steps_per_epoch)
    drawn = [epoch_batches(r.progress.samplers, branches, steps, batch_size) for r in runs]
    if any(batches != drawn[0] for batches in drawn[1:]) or any(not _same_state(r.rng, lead.rng) for r in runs):
        raise RuntimeError(f"fused rows drew different batches in epoch {epoch}: they do not share a data stream")
    _set_random_state(lead.rng)
    models = [r.setup.model for r in runs]
    for model in models:
        model.train()
    loss_sums = [torch.zeros((), device=device) for _ in runs]
    start = time.perf_counter()
    loader = iter(train_loader(bundle, drawn[0], cfg, device))
    lrs = [0.0] * len(runs)
    for step in range(steps):
        for i, (run, pcfg) in enumerate(zip(runs, pcfgs)):
            lrs[i] = lr_at(epoch * steps + step, pcfg.epochs * steps, pcfg.warmup_epochs * steps, pcfg.lr, pcfg.min_lr)
            for group in run.progress.optimizer.param_groups:
                group["lr"] = lrs[i]
        parts = [next(loader) for _ in branches]
        images = torch.cat([p[0] for p in parts]).to(device, non_blocking=True)
        labels = [p[1].to(device, non_blocking=True) for p in parts]
        values = fused_train_step(models, images, labels, losses, [r.progress.optimizer for r in runs],
                                  cfg.precision)
        for value, loss_sum in zip(values, loss_sums):
            loss_sum += value
    elapsed = time.perf_counter() - start
    images_seen = steps * batch_size * len(branches)
    after_epoch = _random_state(device)
    for run, loss_sum, lr in zip(runs, loss_sums, lrs):
        run.rng = after_epoch
        mean_loss = (loss_sum / steps).item()
        run.metrics = {"epoch": epoch, "loss": mean_loss, "lr": lr, "epoch_time_s": elapsed,
                       "train_images_per_s": images_seen / elapsed}
        if not math.isfinite(mean_loss):
            run.error = NonFiniteLossError(f"{STAGE} epoch {epoch}: training loss is {mean_loss} (lr {lr:.3g})")


def _evaluate(runs: list[_RowRun]) -> None:
    """One evaluation pass for rows at the same random state (its data loader draws once, as each row's would)."""
    lead = runs[0]
    _set_random_state(lead.rng)
    outs = evaluate_rows([r.setup.model for r in runs], lead.setup.bundle.test, lead.setup.device, lead.cfg)
    after = _random_state(lead.setup.device)
    for run, out in zip(runs, outs):
        run.out, run.rng = out, after
        run.metrics = {**run.metrics, **eval_metrics(run.cfg, run.setup.bundle, out)}


def _end_epoch(run: _RowRun, epoch: int, keep_checkpoints: int) -> None:
    run.history.append(run.metrics)
    _set_random_state(run.rng)  # the checkpoint records the state this row's next epoch starts from
    run.checkpoint_dir = save_checkpoint(run.row.workdir / "checkpoints" / f"epoch_{epoch:04d}",
                                         checkpoint_state(run.setup, STAGE, run.progress, epoch, run.history),
                                         {**run.meta, "epoch": epoch})
    prune_checkpoints(run.row.workdir / "checkpoints", keep=keep_checkpoints)
    run.next_epoch = epoch + 1
    run.row.hooks.log(progress_line(STAGE, epoch, run.cfg.stage_config(STAGE).epochs, run.metrics))
    run.row.hooks.on_epoch_end(epoch, run.metrics, run.checkpoint_dir)


def run_fused_stage(rows: Sequence[FusedRow], keep_checkpoints: int = 2) -> list[RowOutcome]:
    """Trains the phase 2 of every row together; one outcome per row, in order.

    A row whose loss turns NaN ends with its error and the others go on. Anything else (out of memory, a failing
    hook) ends the fused run, as it would end `run_stage`: each row resumes from its newest checkpoint.
    """
    check_fusable([row.cfg for row in rows])
    runs = _start_rows(rows)
    epochs = rows[0].cfg.stage_config(STAGE).epochs
    epoch = min(run.next_epoch for run in runs)
    try:
        for epoch in range(epoch, epochs):
            standing = [run for run in runs if run.next_epoch == epoch and run.error is None]
            if not standing:
                continue
            _train_epoch(standing, epoch)
            standing = [run for run in standing if run.error is None]
            if standing and (epoch == epochs - 1 or (epoch + 1) % rows[0].cfg.eval.every_epochs == 0):
                _evaluate(standing)
            for run in standing:
                _end_epoch(run, epoch, keep_checkpoints)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        release_cached_memory(runs[0].setup.device)
        error = out_of_memory_error(err, rows[0].cfg, STAGE, epoch, runs[0].setup.device)
        raise StageOutOfMemoryError(f"{error}; {len(rows)} rows were training fused in this process: fewer rows at "
                                    f"once need less (fuse_max_rows in a sweep; a resume trains them alone)") from err
    return _finish(runs)


def _finish(runs: list[_RowRun]) -> list[RowOutcome]:
    resumed_done = [run for run in runs if run.error is None and run.out is None]
    for run in resumed_done:  # resumed after its last epoch: evaluate what its checkpoint holds
        run.checkpoint_dir = Path(run.row.resume_from)
        run.metrics = dict(run.history[-1]) if run.history else {}
    if resumed_done:
        _evaluate(resumed_done)
    finished = [run for run in runs if run.error is None]
    lead = runs[0].setup
    trains = iter(train_queries_of_rows([run.setup.model for run in finished], lead.bundle, lead.device, runs[0].cfg)
                  if finished and wants_feature_stats(runs[0].cfg, lead.bundle) else [None] * len(finished))
    outcomes = []
    for run in runs:
        if run.error is not None:
            outcomes.append(RowOutcome(error=run.error))
            continue
        result = finish_result(run.cfg, STAGE, run.setup, run.out, run.metrics, run.history, run.checkpoint_dir,
                               train=next(trains))
        result.extras.update(resumed_after_epoch=run.first_epoch - 1 if run.row.resume_from else None,
                             trainable_params=sum(p.numel() for p in run.params), backbone=vars(run.setup.identity))
        outcomes.append(RowOutcome(result=result))
    return outcomes
