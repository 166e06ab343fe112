"""The naive reference of benchmark measure 2 must compute what LPTModel computes (same logits, same gradients),
or the measured speed-up compares different work."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from benchmarks.naive_reference import NaivePhase2
from lpt_core.config import PromptConfig
from lpt_core.model import LPTModel

NUM_CLASSES = 5


def _bare_model(**prompt) -> LPTModel:
    torch.manual_seed(3)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16,
                                 patch_size=4, embed_dim=32, depth=4, num_heads=2)
    return LPTModel(backbone, NUM_CLASSES, PromptConfig(**{"length": 2, "pool_size": 4, **prompt}))


def _model() -> LPTModel:
    model = _bare_model()
    with torch.no_grad():  # large enough to matter: the default initialisation is tiny
        model.shared_prompt.tokens.normal_()
        model.group_pool.prompts.normal_()
    return model.eval()


def _images() -> torch.Tensor:
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(11))


def test_naive_phase2_logits_and_matches_equal_lpt() -> None:
    model = _model()
    with torch.no_grad():
        ours, ref = model(_images(), "phase2"), NaivePhase2(model)(_images())
    torch.testing.assert_close(ref.logits, ours.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(ref.topk_idx, ours.topk_idx)
    # and the group prompts matter here, so equal logits are not the trivial case
    assert not torch.allclose(ours.logits, model(_images(), "phase1").logits, atol=1e-3)


def test_naive_phase2_trains_the_same_tensors_with_the_same_gradients() -> None:
    model = _model()
    params = model.set_trainable("phase2")
    labels = torch.arange(6) % NUM_CLASSES
    grads = []
    for forward in (lambda: model(_images(), "phase2"), lambda: NaivePhase2(model)(_images())):
        for p in params:
            p.grad = None
        out = forward()
        (F.cross_entropy(20 * out.logits, labels) - out.topk_sim.mean()).backward()
        grads.append([p.grad.clone() for p in params])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ref, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prompt", [{"shared": False}, {"query": "pretrained"}])
def test_naive_phase2_refuses_settings_it_does_not_reproduce(prompt: dict) -> None:
    with pytest.raises(ValueError, match="default setting"):
        NaivePhase2(_bare_model(**prompt))
