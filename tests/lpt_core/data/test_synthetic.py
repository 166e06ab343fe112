"""The demo domain (lpt_core/data/synthetic.py): determinism, long-tailed profile, group structure, cache, errors."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lpt_core.config import ConfigError, DataConfig
from lpt_core.data import DATASETS, Normalization, build_dataset
from lpt_core.data import synthetic

SMALL = {"num_classes": 12, "num_groups": 4, "n_max": 20, "tau": 10, "test_per_class": 3, "source_per_class": 3,
         "source_test_per_class": 2}


def data_config(tmp_path: Path, **options) -> DataConfig:
    return DataConfig(name="demo", cache_dir=str(tmp_path), options={**SMALL, **options}, img_size=32,
                      resize_size=32, crop_min_scale=0.5)


def test_registered() -> None:
    assert DATASETS["demo"] is synthetic.demo


def test_default_eval_set_gives_one_point_intervals() -> None:
    """The demo's table must resolve 1-point differences: the worst-case (p = 0.5) binomial 95 % half-width of
    overall accuracy on the default test split is under 1 point (it was 3.1 with 20 images per class)."""
    from lpt_core.data.synthetic import DemoOptions

    options = DemoOptions()
    images = options.test_per_class * options.num_classes
    assert images == 10_000
    assert 100 * 1.96 * math.sqrt(0.25 / images) == pytest.approx(0.98)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = synthetic.target_splits(data_config(tmp_path / "a"))
    b = synthetic.target_splits(data_config(tmp_path / "b"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["train_images"].dtype == torch.uint8 and a["train_images"].shape[1:] == (32, 32, 3)


def test_different_seeds_differ(tmp_path: Path) -> None:
    a = synthetic.target_splits(data_config(tmp_path, seed=0))
    b = synthetic.target_splits(data_config(tmp_path, seed=1))
    assert not torch.equal(a["train_images"], b["train_images"])
    assert not torch.equal(a["test_images"], b["test_images"])


@pytest.mark.parametrize("tau", [10, 100])
def test_class_counts_follow_exponential_profile(tmp_path: Path, tau: int) -> None:
    bundle = build_dataset(data_config(tmp_path, num_classes=20, num_groups=5, n_max=100, tau=tau))
    expected = [math.floor(100 * (1 / tau) ** (c / 19)) for c in range(20)]
    assert bundle.class_counts.tolist() == expected
    assert torch.bincount(bundle.train_labels, minlength=20).tolist() == expected
    assert expected[0] == 100 and expected[-1] == 100 // tau


def test_balanced_test_and_val_splits(tmp_path: Path) -> None:
    cfg = data_config(tmp_path, val_per_class=2)
    bundle = build_dataset(cfg)
    assert torch.bincount(bundle.test.labels).tolist() == [3] * 12
    cfg.eval_split = "val"
    assert torch.bincount(build_dataset(cfg).test.labels).tolist() == [2] * 12


def test_bundle_items_go_through_the_transforms(tmp_path: Path) -> None:
    bundle = build_dataset(data_config(tmp_path), Normalization())
    image, label = bundle.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert -1.0 <= image.min() and image.max() <= 1.0
    eval_image, _ = bundle.train_eval[0]
    assert torch.equal(eval_image, bundle.train_eval[0][0])  # the test transform is deterministic
    assert len(bundle.train_eval) == len(bundle.train) == int(bundle.class_counts.sum())
    assert bundle.class_names[:5] == ["g0_c0", "g1_c0", "g2_c0", "g3_c0", "g0_c1"]


def test_groups_share_shape_and_texture_and_classes_differ_within_a_group() -> None:
    options = synthetic.DemoOptions(num_classes=50, num_groups=10)
    attributes = synthetic.class_attributes(options)  # [C, 6]: shape, texture, hue, count, orientation, filled
    groups = np.arange(50) % 10
    identities = {tuple(attributes[groups == g][:, :2].tolist()[0]) for g in range(10)}
    assert len(identities) == 10  # every group has its own (shape, texture)
    for g in range(10):
        members = attributes[groups == g]
        assert (members[:, :2] == members[0, :2]).all()  # shared by the group
        assert len({tuple(row) for row in members[:, 2:].tolist()}) == len(members)  # distinct classes
    assert len({synthetic.group_identity(g) for g in range(100)}) == 100


def test_group_is_visible_in_the_pixels(tmp_path: Path) -> None:
    """Nearest group centroid of the image spectrum beats chance: the group is in the pixels, not only the label."""
    splits = synthetic.target_splits(data_config(tmp_path, num_classes=8, num_groups=4, n_max=40, tau=1,
                                                 test_per_class=10))

    def spectrum(images: torch.Tensor) -> torch.Tensor:
        grey = images.float().mean(-1)
        return torch.fft.rfft2(grey - grey.mean((1, 2), keepdim=True)).abs().flatten(1).log1p()

    train, test = spectrum(splits["train_images"]), spectrum(splits["test_images"])
    train_groups, test_groups = splits["train_labels"] % 4, splits["test_labels"] % 4
    centroids = torch.stack([train[train_groups == g].mean(0) for g in range(4)])
    predicted = torch.cdist(test, centroids).argmin(1)
    assert (predicted == test_groups).float().mean() > 0.5  # chance: 0.25


def test_second_build_hits_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    draw = synthetic._target_splits
    monkeypatch.setattr(synthetic, "_target_splits", lambda options: calls.append(1) or draw(options))
    first = synthetic.target_splits(data_config(tmp_path))
    second = synthetic.target_splits(data_config(tmp_path))
    assert len(calls) == 1
    assert torch.equal(first["train_images"], second["train_images"])
    files = list((tmp_path / "demo").glob("target-*.pt"))
    assert len(files) == 1 and not list((tmp_path / "demo").glob("*.tmp"))
    synthetic.target_splits(data_config(tmp_path, source_per_class=7))  # source-only options: same target file
    assert len(calls) == 1
    synthetic.target_splits(data_config(tmp_path, tau=5))
    assert len(calls) == 2


def test_source_split(tmp_path: Path) -> None:
    images, labels, num_classes = synthetic.demo_source_split(data_config(tmp_path))
    assert num_classes == synthetic.NUM_SOURCE_CLASSES == 60
    assert images.shape == (60 * 3, 32, 32, 3) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [3] * 60
    test_images, test_labels, _ = synthetic.demo_source_split(data_config(tmp_path), "test")
    assert torch.bincount(test_labels).tolist() == [2] * 60
    assert not torch.equal(images[:len(test_images)], test_images)
    with pytest.raises(ValueError, match="split='val'"):
        synthetic.demo_source_split(data_config(tmp_path), "val")


def test_shift_zero_draws_the_target_like_the_source() -> None:
    assert synthetic.SOURCE_RENDERING.towards(synthetic.TARGET_RENDERING, 0.0) == synthetic.SOURCE_RENDERING
    assert synthetic.SOURCE_RENDERING.towards(synthetic.TARGET_RENDERING, 1.0) == synthetic.TARGET_RENDERING


@pytest.mark.parametrize("options, message", [
    ({"num_clases": 5}, r"data\.options\.num_clases.*did you mean 'num_classes'"),
    ({"colour": 1}, r"data\.options\.colour.*valid options: .*num_groups"),
    ({"num_classes": "50"}, r"data\.options\.num_classes='50'.*expected int"),
    ({"tau": 0.5}, r"data\.options\.tau=0\.5"),
    ({"n_max": 5, "tau": 10}, r"data\.options\.n_max=5.*rarest class"),
    ({"num_groups": 13}, r"data\.options\.num_groups=13"),
    ({"shift": 1.5}, r"data\.options\.shift=1\.5"),
    ({"test_per_class": 0}, r"data\.options\.test_per_class=0"),
])
def test_bad_options_name_the_key(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_dataset(data_config(tmp_path, **options))


def test_val_split_needs_val_images(tmp_path: Path) -> None:
    cfg = data_config(tmp_path)
    cfg.eval_split = "val"
    with pytest.raises(ConfigError, match="val_per_class"):
        build_dataset(cfg)
