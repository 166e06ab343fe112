"""Classification and matching losses of LPT, written step by step as in lpt-method.md.

Everything here is a pure function of its tensor inputs: device and dtype follow `cos`, there is no global
state, and the random Gaussian cloud draws from an optional `torch.Generator` so a run can be replayed. The
softmax and its log are always taken in float32, because under bf16 autocast `log p` of a 20x-scaled logit loses
the digits that the focusing weights and label smoothing depend on.

The trainer picks a loss by name through `build_classification_loss`; it never branches on `LossConfig.name`.
"""
from __future__ import annotations

from typing import Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lpt_core.config import LossConfig

Branch = Literal["cb", "ib"]
BRANCHES: tuple[str, ...] = ("cb", "ib")  # class-balanced and instance-balanced batch of dual sampling

# Floor of 1 - p_y in the target's focusing weight: 0 ** lambda+ has an infinite derivative for 0 < lambda+ < 1,
# so a sample with p_y exactly 1 would turn the whole gradient into NaN. In float32, 1 - p is either 0 or >= 6e-8,
# so the clamp only replaces exact zeros, and lambda+ * 1e-12 ** (lambda+ - 1) <= 1e12 stays finite.
_ONE_MINUS_P_MIN = 1e-12


def class_difficulty(class_counts: Tensor) -> Tensor:
    """delta_c = (log n_max - log n_c) / (log n_max - log n_min): 0 for the head class, 1 for the rarest.

    It sets how far the Gaussian cloud may push a class's logit down, so tail classes get the largest cloud.
    Returns float32 [C]; all counts equal means no class is harder than another, hence zeros.
    """
    if class_counts.ndim != 1 or class_counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D tensor, got shape {tuple(class_counts.shape)}")
    bad = torch.nonzero(class_counts <= 0).flatten()
    if bad.numel():
        first = int(bad[0])
        raise ValueError(f"class_counts[{first}]={class_counts[first].item()}: every class needs n_c >= 1")
    log_n = class_counts.double().log()  # float64 so that close counts give an exact 0 span, not rounding noise
    span = log_n.max() - log_n.min()
    if span == 0:
        return torch.zeros_like(log_n, dtype=torch.float32)
    return ((log_n.max() - log_n) / span).float()


def gaussian_cloud(shape: torch.Size, *, sigma: float, clip: float, device: torch.device,
                   generator: torch.Generator | None = None) -> Tensor:
    """eps = |clip(N(0, sigma), -clip, clip)|, one fresh draw per logit (float32).

    `generator`, if given, must live on `device` (a CUDA generator for CUDA logits).
    """
    eps = torch.randn(shape, device=device, dtype=torch.float32, generator=generator) * sigma
    return eps.clamp(-clip, clip).abs()


def agcl_loss(cos: Tensor, target: Tensor, delta: Tensor, *, lambda_pos: float, lambda_neg: float,
              noise_sigma: float = 1.0 / 3.0, noise_clip: float = 1.0, noise_mul: float = 0.5,
              margin: float = 0.1, scale: float = 20.0, label_smoothing: float = 0.1, noise: bool = True,
              generator: torch.Generator | None = None) -> Tensor:
    """Asymmetric Gaussian clouded logit loss on cosine logits; a scalar, the mean over the batch.

    cos: [B, C] cosine logits in [-1, 1]; target: [B] int64 labels y; delta: [C] class difficulty delta_c.
    The focusing weights are not detached (as in the authors' code), so they shape the gradient too.
    """
    if cos.ndim != 2 or delta.shape != cos.shape[1:]:
        raise ValueError(f"agcl_loss: cos must be [B, C] and delta [C]; got {tuple(cos.shape)}, {tuple(delta.shape)}")
    num_classes = cos.shape[1]
    v = cos.float()  # [B, C]
    if noise:
        # steps 2-3: the cloud lowers each logit by up to noise_mul * delta_c, most for the rarest classes
        eps = gaussian_cloud(v.shape, sigma=noise_sigma, clip=noise_clip, device=v.device, generator=generator)
        v = v - noise_mul * eps * delta.to(device=v.device, dtype=torch.float32)
    onehot = F.one_hot(target, num_classes).to(v.dtype)  # [B, C]
    z = scale * (v - margin * onehot)  # step 4: margin on the target logit only, then the scale s
    log_p = F.log_softmax(z, dim=1)  # [B, C]
    # step 5: (1 - p_y) ** lambda+ on the target, p_j ** lambda- on the others (single-label ASL);
    # p ** lambda- is taken as exp(lambda- * log p), exact and smooth even where p underflows to 0
    w_pos = (1 - log_p.exp()).clamp_min(_ONE_MINUS_P_MIN).pow(lambda_pos)
    w_neg = torch.exp(lambda_neg * log_p)
    w = torch.where(onehot.bool(), w_pos, w_neg)
    t = (1 - label_smoothing) * onehot + label_smoothing / num_classes
    return -(t * w * log_p).sum(dim=1).mean()  # step 6


def ce_loss(cos: Tensor, target: Tensor, *, scale: float = 20.0, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy on s * cos: the CE baseline that A-GCL replaces (Tab. 8 row (b) vs (c))."""
    return F.cross_entropy(scale * cos.float(), target, label_smoothing=label_smoothing)


def matching_loss(topk_similarity: Tensor) -> Tensor:
    """1 - (1/k) sum_{i in top-k} cos(q, k_i), mean over the batch; topk_similarity: [B, k].

    This is the only term that reaches the keys, pulling each selected key towards its queries.
    """
    return 1 - topk_similarity.float().mean(dim=1).mean()


def beta_schedule(epoch: int, epochs: int, eta: float) -> float:
    """beta_e = eta * (E - e) / E, e = 0..E-1: the instance-balanced batch fades out over training."""
    if not 0 <= epoch < epochs:
        raise ValueError(f"beta_schedule: epoch={epoch} must be in [0, epochs={epochs})")
    return eta * (epochs - epoch) / epochs


class ClassificationLoss(Protocol):
    def __call__(self, cos: Tensor, target: Tensor, *, generator: torch.Generator | None = None) -> Tensor: ...


LossBuilder = Callable[[LossConfig, Branch, Tensor], ClassificationLoss]


def _build_agcl(cfg: LossConfig, branch: Branch, class_counts: Tensor) -> ClassificationLoss:
    delta = class_difficulty(class_counts)
    lambda_pos = getattr(cfg, f"lambda_pos_{branch}")
    lambda_neg = getattr(cfg, f"lambda_neg_{branch}")

    def loss(cos: Tensor, target: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        nonlocal delta
        if delta.device != cos.device:
            delta = delta.to(cos.device)  # moved once, on the first call, not every step
        return agcl_loss(cos, target, delta, lambda_pos=lambda_pos, lambda_neg=lambda_neg,
                         noise_sigma=cfg.noise_sigma, noise_clip=cfg.noise_clip, noise_mul=cfg.noise_mul,
                         margin=cfg.margin, scale=cfg.scale, label_smoothing=cfg.label_smoothing,
                         generator=generator)

    return loss


def _build_ce(cfg: LossConfig, branch: Branch, class_counts: Tensor) -> ClassificationLoss:
    def loss(cos: Tensor, target: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return ce_loss(cos, target, scale=cfg.scale, label_smoothing=cfg.label_smoothing)

    return loss


CLASSIFICATION_LOSSES: dict[str, LossBuilder] = {"agcl": _build_agcl, "ce": _build_ce}


def build_classification_loss(cfg: LossConfig, branch: Branch, class_counts: Tensor) -> ClassificationLoss:
    """The training loss (cos [B, C], target [B], *, generator=None) -> scalar for one branch's batches."""
    if cfg.name not in CLASSIFICATION_LOSSES:
        raise ValueError(f"loss.name={cfg.name!r}: unknown loss; valid: {sorted(CLASSIFICATION_LOSSES)}")
    if branch not in BRANCHES:
        raise ValueError(f"branch={branch!r}: unknown branch; valid: {list(BRANCHES)}")
    return CLASSIFICATION_LOSSES[cfg.name](cfg, branch, class_counts)
