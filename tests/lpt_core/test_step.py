"""lpt_core.step: the loss of a step from tiny tensors with a known answer, and one update by hand."""
from __future__ import annotations

import pytest
import torch

from lpt_core.config import LossConfig, StageConfig
from lpt_core.losses import beta_schedule, matching_loss
from lpt_core.model import LPTOutput
from lpt_core.step import StepLoss, train_step

COUNTS = torch.tensor([8, 4, 2])


def _mean_logit(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A stand-in classification loss whose value is easy to compute by hand."""
    return logits.mean() + y.float().sum()


def test_each_branch_gets_its_rows_its_loss_and_its_weight() -> None:
    loss = StepLoss(("cb", "ib"), (_mean_logit, lambda logits, y: 10 * logits.sum()), (1.0, 0.25), 2.0)
    logits = torch.tensor([[1.0, 3.0], [5.0, 7.0], [0.5, 0.5]])  # rows 0-1: cb, row 2: ib
    sim = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])  # [B, k] top-k similarities
    out = LPTOutput(logits=logits, query=torch.zeros(3, 2), topk_sim=sim)
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    cb = (4.0 + 1) + 2.0 * matching_loss(sim[:2])
    ib = 10 * 1.0 + 2.0 * matching_loss(sim[2:])
    assert loss(out, labels).item() == pytest.approx((cb + 0.25 * ib).item())
    without_pool = LPTOutput(logits=logits, query=torch.zeros(3, 2))  # phase 1: no matching term
    assert loss(without_pool, labels).item() == pytest.approx(5.0 + 0.25 * 10.0)


@pytest.mark.parametrize("sampling, branches, weights", [
    ("dual", ("cb", "ib"), (1.0, beta_schedule(3, 10, 0.5))),
    ("class_balanced", ("cb",), (1.0,)),
    ("instance", ("ib",), (1.0,)),
])
def test_for_epoch_follows_the_phase_config(sampling: str, branches: tuple, weights: tuple) -> None:
    pcfg = StageConfig(epochs=10, sampling=sampling, loss=LossConfig(eta=0.5, match_weight=0.3))
    loss = StepLoss.for_epoch(pcfg, COUNTS, epoch=3)
    assert loss.branches == branches and loss.weights == pytest.approx(weights) and loss.match_weight == 0.3
    assert len(loss.losses) == len(branches)


def test_train_step_is_forward_loss_backward_update() -> None:
    weight = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    images = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    loss = StepLoss(("cb",), (lambda logits, y: logits.sum(),), (1.0,), 0.0)
    value = train_step(lambda x: LPTOutput(logits=x @ weight.t(), query=x), images, [torch.tensor([0, 1])], loss,
                       optimizer, "fp32")
    before = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    assert value.item() == pytest.approx((images @ before.t()).sum().item()) and not value.requires_grad
    grad = images.sum(0).expand(2, 2)  # d/dW of sum(x W^T): every row of W gets the sum of the inputs
    torch.testing.assert_close(weight.detach(), before - 0.1 * grad)
