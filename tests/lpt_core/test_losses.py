"""A-GCL, CE, matching loss and beta schedule against values worked out by hand with `math`."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lpt_core.config import LossConfig
from lpt_core.losses import (
    CLASSIFICATION_LOSSES,
    agcl_loss,
    beta_schedule,
    build_classification_loss,
    ce_loss,
    class_difficulty,
    gaussian_cloud,
    matching_loss,
)

NOISE_OFF = dict(noise=False)


# --- class_difficulty ------------------------------------------------------------------------------------------

def test_class_difficulty_hand_values() -> None:
    # n = 100, 10, 1: log n_max - log n_min = log 100; class 1 sits halfway in log space
    delta = class_difficulty(torch.tensor([100, 10, 1]))
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta, torch.tensor([0.0, 0.5, 1.0]))
    # unsorted counts: delta_c = log(8 / n_c) / log(8 / 2)
    delta = class_difficulty(torch.tensor([2, 8, 4]))
    expected = [math.log(8 / n) / math.log(4) for n in (2, 8, 4)]
    torch.testing.assert_close(delta, torch.tensor(expected))


def test_class_difficulty_all_equal_is_zero() -> None:
    delta = class_difficulty(torch.tensor([7, 7, 7, 7]))
    assert delta.dtype == torch.float32
    assert torch.equal(delta, torch.zeros(4))


@pytest.mark.parametrize("counts, index", [([5, 0, 3], 1), ([4, 2, -1, 0], 2), ([0], 0)])
def test_class_difficulty_rejects_empty_classes(counts: list[int], index: int) -> None:
    with pytest.raises(ValueError, match=rf"class_counts\[{index}\]"):
        class_difficulty(torch.tensor(counts))


def test_class_difficulty_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="1-D"):
        class_difficulty(torch.ones(2, 2, dtype=torch.int64))


# --- agcl_loss -------------------------------------------------------------------------------------------------

def _hand_agcl_term(cos: list[float], y: int, *, lambda_pos: float, lambda_neg: float, margin: float,
                    scale: float, ls: float) -> float:
    """-sum_c t_c w_c log p_c for one sample, noise off, with plain math."""
    num_classes = len(cos)
    z = [scale * (c - (margin if j == y else 0.0)) for j, c in enumerate(cos)]
    log_norm = math.log(sum(math.exp(v) for v in z))
    total = 0.0
    for j, zj in enumerate(z):
        log_p = zj - log_norm
        p = math.exp(log_p)
        w = (1 - p) ** lambda_pos if j == y else p ** lambda_neg
        t = (1 - ls) * (j == y) + ls / num_classes
        total -= t * w * log_p
    return total


def test_agcl_two_classes_by_hand() -> None:
    # sample 0: v = [0.3 - 0.1, 0.5] -> z = [4, 10]; sample 1: v = [0.1, 0.4 - 0.1] -> z = [2, 6]
    cos = torch.tensor([[0.3, 0.5], [0.1, 0.4]])
    target = torch.tensor([0, 1])
    z0 = (4.0, 10.0)
    log_p0 = [z - math.log(math.exp(4.0) + math.exp(10.0)) for z in z0]
    p0 = [math.exp(v) for v in log_p0]
    # target 0: t = 0.9 + 0.05, w = (1 - p_0)^0.5; other: t = 0.05, w = p_1^2
    term0 = -(0.95 * (1 - p0[0]) ** 0.5 * log_p0[0] + 0.05 * p0[1] ** 2 * log_p0[1])
    log_p1 = [z - math.log(math.exp(2.0) + math.exp(6.0)) for z in (2.0, 6.0)]
    p1 = [math.exp(v) for v in log_p1]
    term1 = -(0.05 * p1[0] ** 2 * log_p1[0] + 0.95 * (1 - p1[1]) ** 0.5 * log_p1[1])
    expected = (term0 + term1) / 2
    loss = agcl_loss(cos, target, torch.tensor([0.0, 1.0]), lambda_pos=0.5, lambda_neg=2.0, **NOISE_OFF)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_agcl_three_classes_matches_hand_helper() -> None:
    cos = [[0.9, -0.2, 0.4], [-1.0, 0.05, 0.7]]
    target = [2, 0]
    kwargs = dict(lambda_pos=0.5, lambda_neg=8.0, margin=0.1, scale=20.0)
    expected = sum(_hand_agcl_term(c, y, ls=0.1, **kwargs) for c, y in zip(cos, target)) / 2
    loss = agcl_loss(torch.tensor(cos), torch.tensor(target), torch.zeros(3), label_smoothing=0.1, **kwargs,
                     **NOISE_OFF)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_agcl_lambda_zero_is_label_smoothed_ce_with_margin() -> None:
    cos = torch.rand(16, 7) * 2 - 1
    target = torch.randint(0, 7, (16,))
    loss = agcl_loss(cos, target, torch.rand(7), lambda_pos=0.0, lambda_neg=0.0, **NOISE_OFF)
    logits = 20.0 * (cos - 0.1 * F.one_hot(target, 7))
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, label_smoothing=0.1))
    no_margin = agcl_loss(cos, target, torch.rand(7), lambda_pos=0.0, lambda_neg=0.0, margin=0.0, **NOISE_OFF)
    torch.testing.assert_close(no_margin, ce_loss(cos, target, label_smoothing=0.1))


def test_agcl_noise_is_the_seeded_cloud_times_delta() -> None:
    # lambda = 0 makes A-GCL a CE on the clouded logits, so the expected value can be rebuilt from the same draw
    cos = torch.rand(32, 5) * 2 - 1
    target = torch.randint(0, 5, (32,))
    delta = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    loss = agcl_loss(cos, target, delta, lambda_pos=0.0, lambda_neg=0.0,
                     generator=torch.Generator().manual_seed(3))
    eps = gaussian_cloud(cos.shape, sigma=1 / 3, clip=1.0, device=cos.device,
                         generator=torch.Generator().manual_seed(3))
    v = cos - 0.5 * eps * delta - 0.1 * F.one_hot(target, 5)
    torch.testing.assert_close(loss, F.cross_entropy(20.0 * v, target, label_smoothing=0.1))


def test_agcl_noise_shift_statistics_from_the_gradient() -> None:
    # Two classes, scale 1, no margin/smoothing/focusing, cos = 0, target 0: the per-sample gradient on the
    # non-target logit is p_1 / B with logit(p_1) = shift_0 - shift_1, so the shifts can be read back exactly.
    batch, d1 = 20_000, 0.6
    cos = torch.zeros(batch, 2, requires_grad=True)
    loss = agcl_loss(cos, torch.zeros(batch, dtype=torch.int64), torch.tensor([0.0, d1]), lambda_pos=0.0,
                     lambda_neg=0.0, margin=0.0, scale=1.0, label_smoothing=0.0)
    loss.backward()
    p1 = cos.grad[:, 1].double() * batch
    shift = -torch.logit(p1)  # = 0.5 * eps_b1 * delta_1 - 0.5 * eps_b0 * delta_0
    # the head class (delta = 0) is never moved, so every recovered shift is a non-negative class-1 shift
    assert shift.min().item() >= -1e-5
    assert shift.max().item() <= 0.5 * 1.0 * d1 + 1e-5
    expected_mean = 0.5 * (1 / 3) * math.sqrt(2 / math.pi) * d1  # E|N(0, sigma)|; the clip at 3 sigma is negligible
    assert shift.mean().item() == pytest.approx(expected_mean, abs=0.003)


def test_gaussian_cloud_statistics() -> None:
    eps = gaussian_cloud(torch.Size([400, 500]), sigma=1 / 3, clip=1.0, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(0))
    assert eps.dtype == torch.float32 and eps.min() >= 0 and eps.max() <= 1.0
    assert eps.mean().item() == pytest.approx((1 / 3) * math.sqrt(2 / math.pi), abs=0.002)
    wide = gaussian_cloud(torch.Size([10_000]), sigma=5.0, clip=1.0, device=torch.device("cpu"))
    assert wide.max().item() == 1.0  # clipped, and most draws hit the clip


def test_agcl_noise_is_fresh_and_vanishes_for_head_classes() -> None:
    cos = torch.rand(8, 4) * 2 - 1
    target = torch.randint(0, 4, (8,))
    kwargs = dict(lambda_pos=0.5, lambda_neg=8.0)
    delta = torch.tensor([0.0, 0.3, 0.6, 1.0])
    assert agcl_loss(cos, target, delta, **kwargs) != agcl_loss(cos, target, delta, **kwargs)
    head = torch.zeros(4)
    torch.testing.assert_close(agcl_loss(cos, target, head, **kwargs),
                               agcl_loss(cos, target, head, **kwargs, **NOISE_OFF))


@pytest.mark.parametrize("lambda_pos, lambda_neg", [(0.0, 0.0), (0.0, 4.0), (0.5, 8.0), (0.01, 0.5), (2.0, 0.0)])
def test_agcl_gradient_finite_at_saturation(lambda_pos: float, lambda_neg: float) -> None:
    # scale 100 saturates the softmax: p is exactly 1 / 0 in float32, where 0 ** lambda has no finite derivative
    cos = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, -1.0]], requires_grad=True)
    target = torch.tensor([0, 0, 2])
    p = torch.softmax(100.0 * cos.detach(), dim=1)
    assert (p == 1).any() and (p == 0).any()
    loss = agcl_loss(cos, target, torch.tensor([0.0, 0.5, 1.0]), lambda_pos=lambda_pos, lambda_neg=lambda_neg,
                     scale=100.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(cos.grad).all()


def test_agcl_under_bf16_autocast_cpu() -> None:
    features = torch.randn(16, 32)
    weights = torch.randn(10, 32, requires_grad=True)
    target = torch.randint(0, 10, (16,))
    delta = class_difficulty(torch.tensor([500, 300, 100, 50, 20, 10, 5, 3, 2, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = F.normalize(features, dim=1) @ F.normalize(weights, dim=1).T
        assert cos.dtype == torch.bfloat16
        loss = agcl_loss(cos, target, delta, lambda_pos=0.5, lambda_neg=8.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(weights.grad).all()
    reference = agcl_loss(cos.detach().float(), target, delta, lambda_pos=0.5, lambda_neg=8.0, **NOISE_OFF)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quiet = agcl_loss(cos.detach(), target, delta, lambda_pos=0.5, lambda_neg=8.0, **NOISE_OFF)
    torch.testing.assert_close(quiet, reference)


def test_agcl_rejects_mismatched_delta() -> None:
    with pytest.raises(ValueError, match=r"delta \[C\]"):
        agcl_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), torch.zeros(4), lambda_pos=0.0,
                  lambda_neg=0.0)


# --- ce_loss, matching_loss, beta_schedule ---------------------------------------------------------------------

def test_ce_loss_by_hand() -> None:
    # z = [20 * 0.1, 20 * 0.0] = [2, 0]; CE = log(1 + e^-2)
    loss = ce_loss(torch.tensor([[0.1, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-5)
    smoothed = ce_loss(torch.tensor([[0.5, 0.0]]), torch.tensor([0]), scale=2.0, label_smoothing=0.2)
    log_norm = math.log(math.exp(1.0) + 1.0)
    assert smoothed.item() == pytest.approx(-(0.9 * (1.0 - log_norm) + 0.1 * (0.0 - log_norm)), rel=1e-5)


def test_matching_loss_by_hand() -> None:
    similarity = torch.tensor([[0.5, 0.7], [1.0, 0.0]], requires_grad=True)
    loss = matching_loss(similarity)
    assert loss.item() == pytest.approx(1 - (0.6 + 0.5) / 2)
    loss.backward()
    torch.testing.assert_close(similarity.grad, torch.full((2, 2), -0.25))


def test_beta_schedule_four_epochs() -> None:
    assert [beta_schedule(e, 4, 0.5) for e in range(4)] == [0.5, 0.375, 0.25, 0.125]
    for epoch in (-1, 4):
        with pytest.raises(ValueError, match=f"epoch={epoch}"):
            beta_schedule(epoch, 4, 0.5)


# --- registry --------------------------------------------------------------------------------------------------

COUNTS = torch.tensor([400, 100, 20, 5])


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(12, 4) * 2 - 1, torch.randint(0, 4, (12,))


@pytest.mark.parametrize("branch, lambdas", [("cb", (0.0, 4.0)), ("ib", (0.5, 8.0))])
def test_build_agcl_uses_branch_lambdas(branch: str, lambdas: tuple[float, float]) -> None:
    cos, target = _batch()
    loss_fn = build_classification_loss(LossConfig(), branch, COUNTS)
    got = loss_fn(cos, target, generator=torch.Generator().manual_seed(1))
    want = agcl_loss(cos, target, class_difficulty(COUNTS), lambda_pos=lambdas[0], lambda_neg=lambdas[1],
                     generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want)
    assert torch.isfinite(loss_fn(cos, target))  # the generator is optional


def test_build_agcl_follows_config_knobs() -> None:
    cos, target = _batch()
    cfg = LossConfig(margin=0.0, label_smoothing=0.0, scale=5.0, lambda_pos_cb=0.0, lambda_neg_cb=0.0)
    loss_fn = build_classification_loss(cfg, "cb", torch.full((4,), 10))  # equal counts: delta = 0, no cloud
    torch.testing.assert_close(loss_fn(cos, target), ce_loss(cos, target, scale=5.0))


def test_build_ce() -> None:
    cos, target = _batch()
    loss_fn = build_classification_loss(LossConfig(name="ce"), "ib", COUNTS)
    torch.testing.assert_close(loss_fn(cos, target, generator=torch.Generator()),
                               ce_loss(cos, target, scale=20.0, label_smoothing=0.1))


def test_build_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"loss.name='focal'.*\['agcl', 'ce'\]"):
        build_classification_loss(LossConfig(name="focal"), "cb", COUNTS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"branch='xb'.*\['cb', 'ib'\]"):
        build_classification_loss(LossConfig(), "xb", COUNTS)  # type: ignore[arg-type]
    assert set(CLASSIFICATION_LOSSES) == {"agcl", "ce"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_agcl_closure_on_cuda_bf16() -> None:
    loss_fn = build_classification_loss(LossConfig(), "ib", COUNTS)
    weights = torch.randn(4, 16, device="cuda", requires_grad=True)
    features = torch.randn(8, 16, device="cuda")
    target = torch.randint(0, 4, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cos = F.normalize(features, dim=1) @ F.normalize(weights, dim=1).T
        loss = loss_fn(cos, target, generator=torch.Generator(device="cuda").manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and loss.device.type == "cuda"
    assert torch.isfinite(weights.grad).all()
