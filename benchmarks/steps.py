"""Models, batches and the full dual training step that the throughput measures time.

A step is what `lpt_core.train._train_epoch` does per step: one class-balanced and one instance-balanced batch
concatenated into one forward, the real losses of `lpt_core.losses` per branch (A-GCL + matching term, weighted
by beta), backward, an SGD step over the phase's trainable parameters. Batches are random tensors already in
memory (the data pipeline is measured on its own), so the step measures the model alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import timm
import torch
from torch import Tensor

from lpt_core.config import LossConfig, PhaseConfig, PromptConfig
from lpt_core.losses import build_classification_loss, matching_loss
from lpt_core.model import LPTModel, LPTOutput
from lpt_core.runtime import autocast
from lpt_core.sampling import branch_weight
from lpt_core.schedule import build_optimizer

# name -> (timm model, extra kwargs, image size); random weights, no download
SHAPES: dict[str, tuple[str, dict, int]] = {
    "vit_t": ("vit_tiny_patch16_224", {}, 224),
    "vit_s": ("vit_small_patch16_224", {}, 224),
    "vit_b": ("vit_base_patch16_224", {}, 224),
    # the demo's micro ViT (experiments/pretrain_demo.DEMO_BACKBONE), with the demo's prompt length
    "micro": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6,
                                       "num_heads": 3}, 32),
}
PROMPT_LENGTH = {"micro": 4}  # demo experiment: prompt.length=4; the ViT shapes use PromptConfig's P = 10
NUM_CLASSES = 100
BRANCHES = ("cb", "ib")


def build_model(shape: str, device: torch.device, seed: int = 0) -> LPTModel:
    """LPTModel around a random-weight timm ViT of `shape`, PromptConfig defaults (m = 20, k = 2, K = L // 2)."""
    name, kwargs, _ = SHAPES[shape]
    torch.manual_seed(seed)
    backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    cfg = PromptConfig(length=PROMPT_LENGTH.get(shape, PromptConfig.length))
    return LPTModel(backbone, NUM_CLASSES, cfg).to(device)


@dataclass
class DualBatch:
    images: Tensor  # [2B, 3, H, W]: class-balanced rows first, then instance-balanced
    labels: list[Tensor]  # one [B] per branch

    @property
    def size(self) -> int:
        return self.images.shape[0]


def random_batch(shape: str, per_branch: int, device: torch.device, seed: int = 0) -> DualBatch:
    size = SHAPES[shape][2]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2 * per_branch, 3, size, size, generator=generator).to(device)
    labels = [torch.randint(0, NUM_CLASSES, (per_branch,), generator=generator).to(device) for _ in BRANCHES]
    return DualBatch(images, labels)


def class_counts() -> Tensor:
    """A long-tailed profile (imbalance 100) so A-GCL's class difficulty and cloud are not trivial."""
    return (500 * 100 ** (-torch.arange(NUM_CLASSES) / (NUM_CLASSES - 1))).floor().long().clamp_min(1)


Forward = Callable[[Tensor], LPTOutput]


class DualStep:
    """One optimisation step of a phase: forward on both branches at once, weighted branch losses, SGD step."""

    def __init__(self, forward: Forward, params: list[torch.nn.Parameter], device: torch.device,
                 precision: str = "fp32", epoch: int = 0, epochs: int = 90) -> None:
        self.forward, self.device, self.precision = forward, device, precision
        pcfg = PhaseConfig(loss=LossConfig())
        self.match_weight = pcfg.loss.match_weight
        self.optimizer = build_optimizer(params, pcfg)
        counts = class_counts()
        self.losses = [build_classification_loss(pcfg.loss, b, counts) for b in BRANCHES]
        self.weights = [branch_weight(b, "dual", epoch, epochs, pcfg.loss.eta) for b in BRANCHES]

    def run_forward(self, batch: DualBatch) -> LPTOutput:
        with autocast(self.device, self.precision):
            return self.forward(batch.images)

    def loss(self, out: LPTOutput, batch: DualBatch) -> Tensor:
        total = torch.zeros((), device=self.device)
        offset = 0
        for loss_fn, weight, y in zip(self.losses, self.weights, batch.labels):
            rows = slice(offset, offset + len(y))
            branch_loss = loss_fn(out.logits[rows].float(), y)
            if out.topk_sim is not None:
                branch_loss = branch_loss + self.match_weight * matching_loss(out.topk_sim[rows])
            total = total + weight * branch_loss
            offset += len(y)
        return total

    def update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def __call__(self, batch: DualBatch) -> None:
        self.update(self.loss(self.run_forward(batch), batch))


def lpt_step(model: LPTModel, phase: str, device: torch.device, precision: str = "fp32") -> DualStep:
    """The project's step: LPTModel.forward(images, phase) with the phase's trainable parameters."""
    params = model.set_trainable(phase)
    model.train()
    return DualStep(lambda images: model(images, phase), params, device, precision)
