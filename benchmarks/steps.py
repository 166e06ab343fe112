"""Models, batches and the full dual training step that the throughput measures time.

A step is what `lpt_core.train._train_epoch` does per step: one class-balanced and one instance-balanced batch
concatenated into one forward, the real losses of `lpt_core.losses` per branch (A-GCL + matching term, weighted
by beta), backward, an SGD step over the phase's trainable parameters. Batches are random tensors already in
memory (the data pipeline is measured on its own), so the step measures the model alone.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import timm
import torch
from torch import Tensor

from lpt_core.config import LossConfig, PhaseConfig, PromptConfig
from lpt_core.losses import build_classification_loss, matching_loss
from lpt_core.model import LPTModel, LPTOutput
from lpt_core.runtime import autocast
from lpt_core.sampling import branch_weight, branches_for
from lpt_core.schedule import build_optimizer


@dataclass(frozen=True)
class Shape:
    model: str  # timm name; random weights, no download
    kwargs: dict
    img_size: int
    prompt_length: int = PromptConfig.length


BRANCHES = branches_for("dual")  # ("cb", "ib"): one class-balanced and one instance-balanced batch per step
VIT_SHAPES = {"vit_t": Shape("vit_tiny_patch16_224", {}, 224), "vit_s": Shape("vit_small_patch16_224", {}, 224),
              "vit_b": Shape("vit_base_patch16_224", {}, 224)}
NUM_CLASSES = 100


@functools.cache
def demo_shape() -> Shape:
    """The demo experiment's micro ViT, image size and prompt length, read from its composed config."""
    from experiments.settings import compose_config, split

    lpt = split(compose_config([])).lpt
    return Shape(lpt["backbone"]["name"], dict(lpt["backbone"]["model_kwargs"]), lpt["data"]["img_size"],
                 lpt["prompt"]["length"])


def shape_of(name: str) -> Shape:
    """vit_t / vit_s / vit_b at 224 px, or "micro": the demo's model."""
    return demo_shape() if name == "micro" else VIT_SHAPES[name]


def build_model(shape: str, device: torch.device, seed: int = 0) -> LPTModel:
    """LPTModel around a random-weight timm ViT of `shape`, PromptConfig defaults (m = 20, k = 2, K = L // 2)."""
    spec = shape_of(shape)
    torch.manual_seed(seed)
    backbone = timm.create_model(spec.model, pretrained=False, num_classes=0, **spec.kwargs).eval()
    return LPTModel(backbone, NUM_CLASSES, PromptConfig(length=spec.prompt_length)).to(device)


@dataclass
class DualBatch:
    images: Tensor  # [2B, 3, H, W]: class-balanced rows first, then instance-balanced
    labels: list[Tensor]  # one [B] per branch

    @property
    def size(self) -> int:
        return self.images.shape[0]


def random_batch(shape: str, per_branch: int, device: torch.device, seed: int = 0) -> DualBatch:
    size = shape_of(shape).img_size
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
