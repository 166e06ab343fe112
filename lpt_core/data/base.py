"""What every dataset hands the trainer, and the registry that finds a dataset by name.

A dataset adapter is a function `(cfg: DataConfig, norm: Normalization) -> DatasetBundle` registered with
`@register_dataset("name")`; the trainer never branches on the dataset's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset

from lpt_core.config import ConfigError, DataConfig


@dataclass(frozen=True)
class Normalization:
    """Input statistics of the backbone's pretrained config (0.5 / 0.5 for the AugReg in21k ViTs)."""

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class DatasetBundle:
    name: str
    num_classes: int
    train: Dataset  # yields (image [3, H, W] float tensor, label int), train augmentation applied
    test: Dataset  # the evaluation split named by DataConfig.eval_split, test transform applied
    train_labels: torch.Tensor  # [N] int64, aligned with `train`; the samplers only look at these
    class_counts: torch.Tensor  # [C] int64, training images per class (n_c)
    train_eval: Dataset | None = None  # the training images with the test transform (K-NN / gamma features)
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.class_counts.numel() != self.num_classes:
            raise ValueError(f"{self.name}: {self.class_counts.numel()} class counts for {self.num_classes} classes")
        empty = torch.nonzero(self.class_counts == 0).flatten().tolist()
        if empty:
            raise ValueError(f"{self.name}: {len(empty)} classes have no training image (first: {empty[:5]})")


DatasetBuilder = Callable[[DataConfig, Normalization], DatasetBundle]
DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    def decorator(builder: DatasetBuilder) -> DatasetBuilder:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} registered twice")
        DATASETS[name] = builder
        return builder

    return decorator


def build_dataset(cfg: DataConfig, norm: Normalization = Normalization()) -> DatasetBundle:
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name={cfg.name!r}: unknown dataset; registered: {sorted(DATASETS)}")
    return DATASETS[cfg.name](cfg, norm)
