"""Models, batches and the training step that the throughput measures time.

The step is lpt_core's own (`lpt_core.step.train_step`, what run_stage runs for every batch): one class-balanced
and one instance-balanced batch concatenated into one forward, the phase's losses per branch (A-GCL + matching
term, weighted by beta of the first of 90 epochs), backward, an SGD step over the phase's trainable parameters.
What is the benchmark's own: random-weight models, batches of random tensors already in memory (the data pipeline
is measured on its own, so the step measures the model alone), and a long-tailed class profile for A-GCL.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import timm
import torch
from torch import Tensor

from lpt_core.config import StageConfig, PromptConfig
from lpt_core.model import LPTModel
from lpt_core.sampling import branches_for
from lpt_core.schedule import build_optimizer
from lpt_core.step import Forward, StepLoss, train_step


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
    from experiments.compose import compose_config, split

    lpt = split(compose_config([])).lpt
    return Shape(lpt.backbone.name, dict(lpt.backbone.model_kwargs), lpt.data.img_size, lpt.prompt.length)


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


class DualStep:
    """lpt_core's training step of a phase over one in-memory dual batch, with the optimizer and losses it keeps.

    `forward` is LPTModel's (lpt_step) or the naive reference's over the same model (measure 2).
    """

    def __init__(self, forward: Forward, params: list[torch.nn.Parameter], device: torch.device,
                 precision: str = "fp32") -> None:
        pcfg = StageConfig()  # the authors' recipe: SGD, A-GCL, dual sampling, 90 epochs
        self.forward, self.device, self.precision = forward, device, precision
        self.optimizer = build_optimizer(params, pcfg)
        self.loss = StepLoss.for_epoch(pcfg, class_counts(), epoch=0)

    def __call__(self, batch: DualBatch) -> None:
        train_step(self.forward, batch.images, batch.labels, self.loss, self.optimizer, self.precision)


def lpt_step(model: LPTModel, phase: str, device: torch.device, precision: str = "fp32") -> DualStep:
    """The project's step: LPTModel.forward(images, phase) with the phase's trainable parameters."""
    params = model.set_trainable(phase)
    model.train()
    return DualStep(lambda images: model(images, phase), params, device, precision)
