"""CIFAR-100-LT: the exponential long-tailed profile drawn from CIFAR-100's training set, tested on its full test set.

n_c = floor(n_max * (1 / tau) ** (c / (C - 1))) for class c = 0..C-1 in CIFAR's label order, with n_max = 500, the
images per class of CIFAR-100 (of a miniature copy: the smallest class size). tau = n_max / n_min is any positive
number; the literature uses 10, 50, 100 and 200 (tau = 100 keeps 10,847 images, tau = 1 the balanced set). The
n_c images kept of a class are the first n_c of a permutation drawn with torch.Generator seeded by `seed`, so a seed
names one subset. The test split is the balanced 10,000-image test set. Images stay in memory as uint8 arrays.

data.root holds cifar-100-python/{train,test,meta}, the "python version" of https://www.cs.toronto.edu/~kriz/cifar.html
(pickled dicts with b"data" uint8 [N, 3072], b"fine_labels"; meta: b"fine_label_names");
data.download=true fetches it there with torchvision.

Options (`data.options`): tau (number > 0, default 100), seed (int, default 0).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lpt_core.config import ConfigError, DataConfig
from lpt_core.data.base import DatasetBundle, Normalization, register_dataset
from lpt_core.data.manifest import DatasetError, check_options
from lpt_core.data.transforms import build_transforms

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")


def long_tail_counts(tau: float, n_max: int = 500, num_classes: int = 100) -> list[int]:
    """n_c = floor(n_max * (1 / tau) ** (c / (C - 1))): the exponential profile, n_0 = n_max, n_{C-1} = n_max / tau."""
    return [int(n_max * (1.0 / tau) ** (c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_indices(labels: torch.Tensor, counts: list[int], seed: int) -> torch.Tensor:
    """Sorted indices keeping counts[c] images of each class c, chosen by a permutation seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for c, n in enumerate(counts):
        members = torch.nonzero(labels == c).flatten()  # [n_available]
        kept.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.cat(kept).sort().values


class ArrayImageDataset(Dataset):
    """uint8 images [N, H, W, 3] in memory, turned into PIL images and transformed on access."""

    def __init__(self, images: np.ndarray, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:  # the official files are Python-2 pickles: keys and strings stay bytes
        return pickle.load(f, encoding="bytes")


def _read_split(path: Path, num_classes: int) -> tuple[np.ndarray, torch.Tensor]:
    """(rows [N, 3072] uint8 (R, G, B planes), fine labels [N] int64) of one pickled split."""
    batch = _unpickle(path)
    data = np.asarray(batch.get(b"data", []))
    labels = torch.as_tensor(batch.get(b"fine_labels", []), dtype=torch.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or len(labels) != len(data):
        raise DatasetError(f"cifar100_lt: {path} is not a CIFAR-100 split (want b'data' uint8 [N, 3072] and N "
                           f"b'fine_labels'; got data {data.dtype} {list(data.shape)}, {len(labels)} labels)")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise DatasetError(f"cifar100_lt: {path}: fine labels outside [0, {num_classes})")
    return data, labels


def _to_hwc(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # [N, 32, 32, 3] for PIL


def cifar_folder(cfg: DataConfig) -> Path:
    """data.root/cifar-100-python, downloaded first when data.download=true; a clear error when it is absent."""
    if not cfg.root:
        raise DatasetError("cifar100_lt: data.root is empty; set it to the folder that holds cifar-100-python/")
    root = Path(cfg.root).expanduser()
    folder = root / FOLDER
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing and cfg.download:
        from torchvision.datasets import CIFAR100

        root.mkdir(parents=True, exist_ok=True)
        CIFAR100(str(root), train=True, download=True)  # the archive holds train, test and meta
        missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise DatasetError(
            f"cifar100_lt: {folder} lacks {missing}; expected data.root/{FOLDER}/{{train,test,meta}}, the python "
            f"version of CIFAR-100 ({CIFAR_URL}). Set data.download=true to fetch it into data.root={str(root)!r}")
    return folder


@register_dataset("cifar100_lt")
def cifar100_lt(cfg: DataConfig, norm: Normalization) -> DatasetBundle:
    options = check_options(cfg, {"tau": float, "seed": int})
    tau = float(options.get("tau", 100))
    if tau <= 0:
        raise ConfigError(f"data.options.tau={tau}: the imbalance ratio must be > 0 (e.g. 10, 50, 100, 200)")
    if cfg.eval_split != "test":
        raise ConfigError(f"data.eval_split={cfg.eval_split!r}: cifar100_lt has only the test split")
    folder = cifar_folder(cfg)
    class_names = [name.decode() for name in _unpickle(folder / "meta")[b"fine_label_names"]]
    num_classes = len(class_names)
    train_rows, train_labels = _read_split(folder / "train", num_classes)
    test_rows, test_labels = _read_split(folder / "test", num_classes)
    test_images = _to_hwc(test_rows)

    n_max = int(torch.bincount(train_labels, minlength=num_classes).min())  # 500 for CIFAR-100
    counts = long_tail_counts(tau, n_max, num_classes)
    if counts[-1] < 1:
        raise ConfigError(f"data.options.tau={tau}: leaves class {num_classes - 1} without images "
                          f"(n_max = {n_max} per class); use tau <= {n_max}")
    keep = long_tail_indices(train_labels, counts, options.get("seed", 0))
    images, labels = _to_hwc(train_rows[keep.numpy()]), train_labels[keep]

    train_tf = build_transforms(cfg.img_size, cfg.resize_size, norm, train=True, crop_min_scale=cfg.crop_min_scale)
    test_tf = build_transforms(cfg.img_size, cfg.resize_size, norm, train=False)
    return DatasetBundle(
        name="cifar100_lt", num_classes=num_classes, train=ArrayImageDataset(images, labels, train_tf),
        test=ArrayImageDataset(test_images, test_labels, test_tf), train_labels=labels,
        class_counts=torch.tensor(counts, dtype=torch.int64),
        train_eval=ArrayImageDataset(images, labels, test_tf), class_names=class_names)
