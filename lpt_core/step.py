"""One optimisation step of a stage: what run_stage does for every batch, and what the benchmarks time.

A step draws one batch per sampling branch (class-balanced "cb", instance-balanced "ib"; one of them in the
single-branch modes), runs them as one concatenated forward, gives each branch's rows its own classification
loss (A-GCL or CE) plus, where prompts are matched, the matching term, weights each branch by beta of the epoch,
then backward and an optimizer step over the stage's trainable parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from lpt_core.config import StageConfig
from lpt_core.losses import build_classification_loss, matching_loss
from lpt_core.model import LPTOutput
from lpt_core.runtime import autocast
from lpt_core.sampling import branch_weight, branches_for

Forward = Callable[[Tensor], LPTOutput]


@dataclass(frozen=True)
class StepLoss:
    """L = sum over branches b of beta_b * (L_cls,b + match_weight * L_match,b), for every step of one epoch."""

    branches: tuple[str, ...]  # in the order their rows are concatenated
    losses: tuple[Callable[..., Tensor], ...]  # L_cls of each branch (its class statistics, its lambdas)
    weights: tuple[float, ...]  # beta of each branch in this epoch
    match_weight: float

    @classmethod
    def for_epoch(cls, pcfg: StageConfig, class_counts: Tensor, epoch: int) -> StepLoss:
        branches = branches_for(pcfg.sampling)
        return cls(branches,
                   tuple(build_classification_loss(pcfg.loss, b, class_counts) for b in branches),
                   tuple(branch_weight(b, pcfg.sampling, epoch, pcfg.epochs, pcfg.loss.eta) for b in branches),
                   pcfg.loss.match_weight)

    def __call__(self, out: LPTOutput, labels: Sequence[Tensor]) -> Tensor:
        """out: the forward of all branches' rows, concatenated; labels: one [B_b] per branch, in that order."""
        loss = torch.zeros((), device=out.logits.device)
        offset = 0
        for loss_fn, weight, y in zip(self.losses, self.weights, labels):
            rows = slice(offset, offset + len(y))
            branch_loss = loss_fn(out.logits[rows].float(), y)
            if out.topk_sim is not None:
                branch_loss = branch_loss + self.match_weight * matching_loss(out.topk_sim[rows])
            loss = loss + weight * branch_loss
            offset += len(y)
        return loss


def update(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_step(forward: Forward, images: Tensor, labels: Sequence[Tensor], loss: StepLoss,
               optimizer: torch.optim.Optimizer, precision: str) -> Tensor:
    """Forward (autocast per `precision`), the loss in fp32, backward, update; returns the loss, detached."""
    with autocast(images.device, precision):
        out = forward(images)
    value = loss(out, labels)
    update(optimizer, value)
    return value.detach()
