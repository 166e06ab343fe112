"""What a stage costs before it runs (lpt_core/cost.py): image counts by hand, and a measured time per image."""
from __future__ import annotations

import dataclasses
import math

import pytest

from lpt_core.config import BackboneConfig, DataConfig, LPTConfig, StageConfig
from lpt_core.cost import StageCost, evaluations, format_duration, seconds_per_image, stage_cost


@pytest.mark.parametrize("epochs, every, expected", [(6, 2, 3), (5, 2, 3), (1, 1, 1), (3, 1, 3), (3, 5, 1)])
def test_evaluations_every_n_epochs_and_after_the_last(epochs, every, expected):
    # 5 epochs, every 2: after epochs 2 and 4 and the last (5): 3
    assert evaluations(epochs, every) == expected


def _cfg(**phase1) -> LPTConfig:
    cfg = LPTConfig()
    cfg = dataclasses.replace(cfg, phase1=dataclasses.replace(cfg.phase1, **phase1))
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every_epochs=2))


def test_stage_cost_by_hand():
    # dual sampling: two branches of 64 per step; 20 steps x 6 epochs; 3 evaluations of 100 test images, and the
    # K-NN statistics' pass over 1000 train + 100 test images
    cost = stage_cost(_cfg(epochs=6, batch_size=64, steps_per_epoch=20, sampling="dual"), "phase1", 1000, 100)
    assert cost == StageCost(6 * 20 * 64 * 2, 3 * 100 + 1000 + 100)
    # one branch, steps from N / B + 1 = 1000 // 64 + 1 = 16, no feature statistics
    cfg = _cfg(epochs=2, batch_size=64, steps_per_epoch=None, sampling="instance")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, feature_stats=False))
    assert stage_cost(cfg, "phase1", 1000, 100) == StageCost(2 * 16 * 64, 1 * 100)
    assert StageCost(100, 50).seconds((0.01, 0.002)) == pytest.approx(1.1)


def test_seconds_per_image_is_measured_on_the_stages_model():
    cfg = LPTConfig(backbone=BackboneConfig(name="vit_tiny_patch16_224", pretrained=False,
                                            model_kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 32,
                                                          "depth": 2, "num_heads": 2}),
                    data=DataConfig(img_size=16), phase2=StageConfig(batch_size=4), device="cpu", threads=1)
    for stage in ("phase1", "phase2", "joint"):
        train, evaluate = seconds_per_image(cfg, stage, num_classes=5, batch=2, repeats=1)
        assert 0 < evaluate and 0 < train and math.isfinite(train)


@pytest.mark.parametrize("seconds, text", [(12.4, "12 s"), (89, "89 s"), (600, "10 min"), (5399, "90 min"),
                                           (3.4 * 3600, "3.4 h"), (300 * 3600, "300 h"), (math.nan, "unknown")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
