"""Optimizers over the trainable parameters only, and the learning-rate schedule as a pure function of the step.

The schedule is linear warm-up then cosine decay, computed from the global step rather than kept in a scheduler
object, so a resumed run needs no scheduler state to land on exactly the same learning rate. Unlike the authors'
code, the first warm-up step is not pinned to 1e-6: warm-up starts at lr / warmup_steps.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from lpt_core.config import StageConfig


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


OPTIMIZERS = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: StageConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters for this phase")
    return OPTIMIZERS[cfg.optimizer](params, cfg)
