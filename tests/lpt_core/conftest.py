"""Fixtures for the lpt_core tests: a micro ViT saved to a local weights file and a tiny separable LT dataset.

Everything is sized so that a full phase-1 or phase-2 run takes well under a second on one CPU thread. The
dataset `test_blobs` is registered once per session in lpt_core's dataset registry; its knobs travel in
`data.options`, so a test that needs a different dataset changes the config, never the code.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from lpt_core.config import ConfigError, DataConfig, LPTConfig, from_dict
from lpt_core.data import DATASETS, DatasetBundle, Normalization, register_dataset
from lpt_core.train import StageHooks

BACKBONE_NAME = "vit_tiny_patch16_224"
# depth 4 -> default K = 2; 17 tokens per image (16 patches + CLS)
MICRO_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)
DATASET = "test_blobs"
BLOB_OPTIONS: dict[str, Any] = {
    "counts": [24, 12, 8, 6, 4],  # long-tailed training split, n_c per class
    "test_per_class": 8,
    "noise": 0.3,  # std of the per-image noise around the class prototype (prototypes have std 1)
    "seed": 0,
}


def _blob_split(protos: torch.Tensor, counts: list[int], noise: float, g: torch.Generator) -> TensorDataset:
    xs, ys = [], []
    for c, n in enumerate(counts):
        xs.append(protos[c] + noise * torch.randn(n, *protos.shape[1:], generator=g))
        ys += [c] * n
    return TensorDataset(torch.cat(xs), torch.tensor(ys, dtype=torch.int64))


def blobs_dataset(cfg: DataConfig, norm: Normalization) -> DatasetBundle:
    """Gaussian blobs around one random image prototype per class: separable, long-tailed, in memory."""
    options = {**BLOB_OPTIONS, **cfg.options}
    unknown = set(options) - set(BLOB_OPTIONS)
    if unknown:
        raise ConfigError(f"data.options: unknown keys {sorted(unknown)} for dataset {DATASET!r}")
    counts = list(options["counts"])
    g = torch.Generator().manual_seed(options["seed"])
    protos = torch.randn(len(counts), 3, cfg.img_size, cfg.img_size, generator=g)
    train = _blob_split(protos, counts, options["noise"], g)
    test = _blob_split(protos, [options["test_per_class"]] * len(counts), options["noise"], g)
    return DatasetBundle(DATASET, len(counts), train, test, train.tensors[1], torch.tensor(counts), train_eval=train)


if DATASET not in DATASETS:
    register_dataset(DATASET)(blobs_dataset)


TIMING_KEYS = {"epoch_time_s", "train_images_per_s"}  # wall-clock measures: the only part of a result that varies


def without_timing(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Equal structure and values; tensors bit-exact; NaN equals NaN (a class group without classes)."""
    assert type(a) is type(b), where
    if torch.is_tensor(a):
        assert a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


class QuietHooks(StageHooks):
    """Collects log lines and epoch-end calls instead of printing."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.epochs: list[tuple[int, dict, Path]] = []

    def log(self, message: str) -> None:
        self.lines.append(message)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        self.epochs.append((epoch, dict(metrics), Path(checkpoint_dir)))


@pytest.fixture(scope="session")
def micro_vit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random micro ViT (timm, no classifier) saved as .safetensors; the 'pretrained' backbone of every run."""
    torch.manual_seed(1234)
    model = timm.create_model(BACKBONE_NAME, pretrained=False, num_classes=0, **MICRO_VIT)
    path = tmp_path_factory.mktemp("weights") / "micro_vit.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="session")
def base_config_dict(micro_vit_file: Path) -> dict[str, Any]:
    """Nested config dict of a tiny run: micro ViT, test_blobs, P = 2, m = 4, one step per branch and epoch."""
    phase = {"epochs": 2, "batch_size": 16, "base_lr": 2.0, "warmup_epochs": 0, "steps_per_epoch": 3}
    return {
        "backbone": {"name": BACKBONE_NAME, "weights_file": str(micro_vit_file), "model_kwargs": dict(MICRO_VIT)},
        "data": {"name": DATASET, "img_size": 16, "resize_size": 16, "eval_batch_size": 64},
        "prompt": {"length": 2, "pool_size": 4},
        "phase1": dict(phase),
        "phase2": dict(phase),
        "joint": dict(phase),
        "eval": {"every_epochs": 100, "feature_stats": False},
        "device": "cpu",
        "threads": 1,
    }


@pytest.fixture(scope="session")
def make_config(base_config_dict: dict[str, Any]) -> Callable[..., LPTConfig]:
    """make_config({'phase1': {'epochs': 4}}) -> validated LPTConfig with the overrides merged into the base."""

    def make(overrides: dict | None = None) -> LPTConfig:
        return from_dict(_merge(base_config_dict, overrides or {}))

    return make


@pytest.fixture(scope="session")
def config_dict(base_config_dict: dict[str, Any]) -> Callable[..., dict]:
    """Like make_config, but the plain nested dict (for JSON files and from_dict tests)."""

    def make(overrides: dict | None = None) -> dict:
        return _merge(base_config_dict, overrides or {})

    return make


@pytest.fixture
def quiet_hooks() -> QuietHooks:
    return QuietHooks()


@pytest.fixture(scope="session")
def phase1_checkpoint(make_config: Callable[..., LPTConfig], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished phase-1 run's last checkpoint folder (phase-2 tests start from it)."""
    from lpt_core.train import run_stage

    workdir = tmp_path_factory.mktemp("phase1")
    return run_stage(make_config(), "phase1", workdir, QuietHooks()).checkpoint_dir


@pytest.fixture
def micro_vit() -> torch.nn.Module:
    """A fresh frozen micro ViT (random weights, no file) for model-level tests."""
    from lpt_core.backbone import create_backbone
    from lpt_core.config import BackboneConfig

    torch.manual_seed(0)
    return create_backbone(BackboneConfig(name=BACKBONE_NAME, pretrained=False, model_kwargs=dict(MICRO_VIT)))
