"""What a stage costs before it runs: how many images go through the model while it trains and evaluates, and a
measured time per image, so that a sweep can say whether it is minutes or GPU-days before it starts.

The time is measured on the real model of the stage (a randomly initialised backbone of the same architecture:
the weights do not change the time) with a few steps, per image: on a GPU at the stage's batch up to 64 (a small
batch would overstate it); on a CPU at 2 images per branch, and again at up to 32 where that step is quick (a small
model, whose per-image cost a tiny batch overstates; a large one costs the same per image at any batch).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from lpt_core.backbone import create_backbone
from lpt_core.config import LPTConfig
from lpt_core.model import LPTModel
from lpt_core.runtime import resolve_device, torch_threads
from lpt_core.sampling import branches_for, steps_per_epoch
from lpt_core.schedule import build_optimizer
from lpt_core.step import StepLoss, train_step


@dataclass(frozen=True)
class StageCost:
    """Images through the stage's model: trained (forward and backward) and evaluated (forward only)."""

    train_images: int
    eval_images: int

    def seconds(self, per_image: tuple[float, float]) -> float:
        return self.train_images * per_image[0] + self.eval_images * per_image[1]


def evaluations(epochs: int, every: int) -> int:
    """Evaluation passes of a stage: every `every` epochs and always after the last (lpt_core.train)."""
    return len({e for e in range(epochs) if (e + 1) % every == 0} | {epochs - 1})


def stage_cost(cfg: LPTConfig, stage: str, train_images: int, test_images: int) -> StageCost:
    """The images a stage trains on (steps x batch x sampling branches) and evaluates (the test split at each
    evaluation, and the training split once more for the query features' K-NN statistics)."""
    pcfg = cfg.stage_config(stage)
    steps = pcfg.epochs * steps_per_epoch(train_images, pcfg.batch_size, pcfg.steps_per_epoch)
    trained = steps * pcfg.batch_size * len(branches_for(pcfg.sampling))
    evaluated = evaluations(pcfg.epochs, cfg.eval.every_epochs) * test_images
    evaluated += train_images + test_images if cfg.eval.feature_stats else 0
    return StageCost(trained, evaluated)


CPU_BATCH, CPU_QUICK_STEP_S, CPU_LARGE_BATCH, GPU_BATCH = 2, 0.05, 32, 64  # images per sampling branch


def seconds_per_image(cfg: LPTConfig, stage: str, num_classes: int, batch: int | None = None,
                      repeats: int = 2) -> tuple[float, float]:
    """(train, eval) seconds per image of `stage` on cfg.device with cfg.threads threads: a warm-up step, then the
    mean of `repeats` timed steps on random images (batch: per sampling branch; default as the module says)."""
    device = resolve_device(cfg.device)
    largest = cfg.stage_config(stage).batch_size
    if batch is None and device.type == "cpu":
        train, evaluate = seconds_per_image(cfg, stage, num_classes, CPU_BATCH, repeats)
        if train * CPU_BATCH * 2 > CPU_QUICK_STEP_S or largest <= CPU_BATCH:
            return train, evaluate
        batch = min(largest, CPU_LARGE_BATCH)
    elif batch is None:
        batch = min(largest, GPU_BATCH)
    with torch_threads(cfg.threads):
        backbone = create_backbone(dataclasses.replace(cfg.backbone, pretrained=False, weights_file=None))
        model = LPTModel(backbone, num_classes, cfg.prompt).to(device)
        pcfg = cfg.stage_config(stage)
        optimizer = build_optimizer(model.set_trainable(stage), pcfg)
        loss = StepLoss.for_epoch(pcfg, torch.full((num_classes,), 10), epoch=0)
        images = torch.randn(batch * len(loss.branches), 3, cfg.data.img_size, cfg.data.img_size, device=device)
        labels = [torch.randint(num_classes, (batch,), device=device) for _ in loss.branches]
        forward = functools.partial(model, stage=stage)
        model.train()
        train = timed(lambda: train_step(forward, images, labels, loss, optimizer, cfg.precision), repeats, device)
        model.eval()
        with torch.no_grad():
            evaluate = timed(lambda: forward(images), repeats, device)
    return train / len(images), evaluate / len(images)


def timed(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Seconds per call: one warm-up call, then the mean of `repeats` (the device synchronised around them)."""
    call()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '3.4 h', '120 h' (an estimate: two significant figures at most)."""
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 10 else f"{hours:.0f} h"
