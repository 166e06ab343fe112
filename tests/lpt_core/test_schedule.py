"""lr_at against hand values; build_optimizer only takes trainable parameters and honours the optimizer name."""
from __future__ import annotations

import math

import pytest
import torch

from lpt_core.config import StageConfig
from lpt_core.schedule import build_optimizer, lr_at


def test_warmup_is_linear_from_base_over_warmup() -> None:
    # 4 warm-up steps of base 0.8: 0.2, 0.4, 0.6, 0.8 (the first step is lr / warmup_steps, not 1e-6)
    assert [lr_at(s, 20, 4, 0.8) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_cosine_starts_at_base_right_after_warmup() -> None:
    assert lr_at(4, 20, 4, 0.8) == pytest.approx(0.8)
    assert lr_at(0, 20, 0, 0.8) == pytest.approx(0.8)  # no warm-up: the very first step is at base


def test_cosine_mid_point_and_end() -> None:
    base, min_lr = 1.0, 0.1
    # total 14, warm-up 4: 10 cosine steps, mid-point at step 9 -> min + (base - min) / 2 exactly
    assert lr_at(9, 14, 4, base, min_lr) == pytest.approx(0.55, abs=1e-12)
    assert lr_at(14, 14, 4, base, min_lr) == pytest.approx(min_lr, abs=1e-12)
    assert lr_at(100, 14, 4, base, min_lr) == pytest.approx(min_lr, abs=1e-12)  # clamped past the end
    # a quarter of the way: min + (base - min) * (1 + cos(pi / 4)) / 2
    quarter = min_lr + (base - min_lr) * (1 + math.cos(math.pi / 4)) / 2
    assert lr_at(4 + 2.5, 14, 4, base, min_lr) == pytest.approx(quarter)


def test_cosine_hand_values_without_min_lr() -> None:
    # total 5, no warm-up: progress 0, .2, .4, .6, .8 -> 0.5 * (1 + cos(pi * p))
    expected = [0.5 * (1 + math.cos(math.pi * s / 5)) for s in range(5)]
    assert [lr_at(s, 5, 0, 1.0) for s in range(5)] == pytest.approx(expected)
    assert expected[0] == 1.0 and expected[-1] == pytest.approx(0.0954915, abs=1e-7)


def test_schedule_is_monotone_up_then_down() -> None:
    lrs = [lr_at(s, 50, 10, 0.3, 0.01) for s in range(50)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert min(lrs) > 0.01


def _params() -> tuple[torch.nn.Parameter, torch.nn.Parameter, torch.nn.Parameter]:
    a, b, frozen = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    frozen.requires_grad_(False)
    return a, b, frozen


def test_build_optimizer_only_takes_trainable_params() -> None:
    a, b, frozen = _params()
    opt = build_optimizer([a, frozen, b], StageConfig())
    params = [p for group in opt.param_groups for p in group["params"]]
    assert len(params) == 2 and params[0] is a and params[1] is b


def test_build_optimizer_refuses_no_trainable_params() -> None:
    _, _, frozen = _params()
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([frozen], StageConfig())


def test_sgd_settings() -> None:
    cfg = StageConfig(optimizer="sgd", base_lr=0.02, batch_size=512, momentum=0.8, weight_decay=0.05)
    opt = build_optimizer(_params()[:2], cfg)
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.04)  # lr = base_lr * B / 256
    assert group["momentum"] == 0.8 and group["weight_decay"] == 0.05


def test_adamw_settings() -> None:
    cfg = StageConfig(optimizer="adamw", base_lr=0.01, batch_size=128, weight_decay=0.3)
    opt = build_optimizer(_params()[:2], cfg)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.005)
    assert group["weight_decay"] == 0.3
