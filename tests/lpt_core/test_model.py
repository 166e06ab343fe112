"""LPTModel: block-K reuse is exact, K is validated, gradients reach exactly the parts lpt-method.md says."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import lpt_core.train as train_module
from lpt_core.config import ConfigError, LPTConfig, PromptConfig
from lpt_core.losses import matching_loss
from lpt_core.model import STAGE_PARTS, TRAINABLE, LPTModel

NUM_CLASSES, DEPTH, DIM, P, M = 5, 4, 32, 2, 4


def _model(backbone, **prompt) -> LPTModel:
    torch.manual_seed(0)
    cfg = PromptConfig(**{"length": P, "pool_size": M, **prompt})
    return LPTModel(backbone, NUM_CLASSES, cfg)


def _images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _grad_is_zero(p: torch.nn.Parameter) -> bool:
    return p.grad is None or bool((p.grad == 0).all())


def _zero_grads(model: LPTModel) -> None:
    for p in model.parameters():
        p.grad = None


# --- structure ---------------------------------------------------------------------------------------------------

def test_block_k_default_is_half_the_depth(micro_vit) -> None:
    model = _model(micro_vit)
    assert model.block_k == DEPTH // 2
    assert model.group_pool.prompts.shape == (M, DEPTH - DEPTH // 2, P, DIM)
    assert model.shared_prompt.tokens.shape == (DEPTH, P, DIM)
    assert model.head.weight.shape == (NUM_CLASSES, DIM)


@pytest.mark.parametrize("block_k", [DEPTH, DEPTH + 3, -1])
def test_block_k_out_of_range_raises(micro_vit, block_k: int) -> None:
    with pytest.raises(ConfigError, match=rf"prompt\.block_k={block_k}"):
        _model(micro_vit, block_k=block_k)


@pytest.mark.parametrize("block_k", [0, DEPTH - 1])
def test_block_k_edges_are_accepted(micro_vit, block_k: int) -> None:
    model = _model(micro_vit, block_k=block_k)
    assert model.group_pool.prompts.shape[1] == DEPTH - block_k
    model.eval()
    assert model(_images(2), "phase2").logits.shape == (2, NUM_CLASSES)


def test_train_keeps_backbone_in_eval_mode(micro_vit) -> None:
    model = _model(micro_vit)
    model.train()
    assert model.training and model.dropout.training
    assert not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    model.eval()
    assert not model.dropout.training


def test_backbone_is_frozen(micro_vit) -> None:
    model = _model(micro_vit)
    for phase in TRAINABLE:
        model.set_trainable(phase)
        assert not any(p.requires_grad for p in model.backbone.parameters())


def test_trainable_parameter_counts_per_phase(micro_vit) -> None:
    model = _model(micro_vit)
    k = model.block_k
    shared = DEPTH * P * DIM  # u: L x P x D
    pool = M * DIM + M * (DEPTH - k) * P * DIM  # keys + group prompts
    head = NUM_CLASSES * DIM
    expected = {"phase1": shared + head, "phase2": pool + head, "joint": shared + pool + head}
    for phase, count in expected.items():
        params = model.set_trainable(phase)
        assert sum(p.numel() for p in params) == count, phase
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count, phase


def test_set_trainable_without_shared_prompt(micro_vit) -> None:
    model = _model(micro_vit, shared=False, query="pretrained")
    assert model.shared_prompt is None
    params = model.set_trainable("phase1")
    assert sum(p.numel() for p in params) == NUM_CLASSES * DIM  # linear probe: the classifier only


def test_trainable_state_excludes_backbone(micro_vit) -> None:
    state = _model(micro_vit).trainable_state()
    assert state and not any(k.startswith("backbone.") for k in state)
    assert {"shared_prompt.tokens", "group_pool.keys", "group_pool.prompts", "head.weight"} <= set(state)


def test_stage_state_holds_what_the_stage_trains_and_hands_on(micro_vit) -> None:
    model = _model(micro_vit)
    assert list(model.stage_state("phase1")) == ["shared_prompt.tokens", "head.weight"]
    for phase in ("phase2", "joint"):  # phase 2 evaluates with the frozen u, so its checkpoint carries it
        assert list(model.stage_state(phase)) == ["shared_prompt.tokens", "group_pool.keys", "group_pool.prompts",
                                                  "head.weight"]
    for phase in STAGE_PARTS:
        assert all(torch.equal(t, model.state_dict()[k]) for k, t in model.stage_state(phase).items())
        assert set(model.trained_parameters(phase)) <= set(model.stage_state(phase))
    assert list(_model(micro_vit, shared=False, query="pretrained").stage_state("phase1")) == ["head.weight"]


def test_phase1_state_does_not_depend_on_the_pool(micro_vit) -> None:
    small, large = _model(micro_vit, pool_size=5, top_k=1, block_k=1), _model(micro_vit, pool_size=20, top_k=3)
    a, b = small.stage_state("phase1"), large.stage_state("phase1")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # same seed: same u and classifier


def test_trained_parameters_are_the_optimizer_order(micro_vit) -> None:
    model = _model(micro_vit)
    expected = {"phase1": ["shared_prompt.tokens", "head.weight"],
                "phase2": ["group_pool.keys", "group_pool.prompts", "head.weight"],
                "joint": ["shared_prompt.tokens", "group_pool.keys", "group_pool.prompts", "head.weight"]}
    for phase, names in expected.items():
        named = model.trained_parameters(phase)
        assert list(named) == names
        assert all(a is b for a, b in zip(named.values(), model.set_trainable(phase), strict=True)), phase


# --- forward -----------------------------------------------------------------------------------------------------

def test_phase1_logits_are_cosines_and_query_is_detached(micro_vit) -> None:
    model = _model(micro_vit).eval()
    out = model(_images(), "phase1")
    assert out.logits.shape == (6, NUM_CLASSES)
    assert out.logits.abs().max() <= 1 + 1e-6
    assert out.topk_idx is None and out.topk_sim is None
    assert not out.query.requires_grad
    # the query is the final CLS after the final LayerNorm: feed it through the head by hand
    expected = F.normalize(out.query, dim=-1) @ F.normalize(model.head.weight, dim=-1).t()
    torch.testing.assert_close(out.logits, expected)


def test_last_block_shared_prompt_changes_phase1_logits(micro_vit) -> None:
    model = _model(micro_vit).eval()
    images = _images()
    before = model(images, "phase1").logits
    with torch.no_grad():
        model.shared_prompt.tokens[DEPTH - 1].normal_()
    assert not torch.allclose(model(images, "phase1").logits, before, atol=1e-5)


def test_phase2_query_equals_phase1_feature(micro_vit) -> None:
    model = _model(micro_vit).eval()
    images = _images()
    torch.testing.assert_close(model(images, "phase2").query, model(images, "phase1").query, atol=1e-5, rtol=1e-5)


def test_pretrained_query_is_the_plain_vit_cls(micro_vit) -> None:
    model = _model(micro_vit, query="pretrained").eval()
    images = _images()
    expected = micro_vit.forward_features(images)[:, 0]  # final CLS after the final norm, no prompt
    torch.testing.assert_close(model(images, "phase2").query, expected)


@pytest.mark.parametrize("prompt", [
    {},
    {"ensemble": "concat"},
    {"query": "pretrained"},
    {"block_k": 1, "top_k": 3},
    {"block_k": 0},
], ids=["mean", "concat", "pretrained_query", "k1_top3", "k0"])
@pytest.mark.parametrize("phase", ["phase2", "joint"])
def test_reuse_block_k_equals_recomputing(micro_vit, prompt: dict, phase: str) -> None:
    reuse = _model(micro_vit, reuse_block_k=True, **prompt).eval()
    recompute = _model(micro_vit, reuse_block_k=False, **prompt).eval()
    recompute.load_state_dict(reuse.state_dict())
    with torch.no_grad():  # make the group prompts matter: default init is tiny
        reuse.group_pool.prompts.normal_()
        recompute.group_pool.prompts.copy_(reuse.group_pool.prompts)
    images = _images()
    a, b = reuse(images, phase), recompute(images, phase)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.topk_idx, b.topk_idx)
    torch.testing.assert_close(a.topk_sim, b.topk_sim, atol=1e-6, rtol=1e-6)


def _literal_logits(model: LPTModel, images: torch.Tensor, phase: str) -> torch.Tensor:
    """lpt-method.md done literally: every block run whole on [tokens, prompts], prompt outputs dropped, the
    final CLS classified; phase 2's group prompt is the mean of the top-k matched by the literal phase-1 CLS."""
    vit = model.backbone

    def run(group: torch.Tensor | None) -> torch.Tensor:
        x = model.embed(images)
        for i, block in enumerate(vit.blocks):
            prompts = model.shared_prompt(i).expand(x.shape[0], -1, -1)
            if group is not None and i >= model.block_k:
                prompts = torch.cat([prompts, group[:, i - model.block_k]], dim=1)
            x = block(torch.cat([x, prompts], dim=1))[:, : x.shape[1]]
        return vit.norm(x)[:, 0]

    feature = run(None)
    if phase == "phase2":
        similarity = F.normalize(feature, dim=-1) @ F.normalize(model.group_pool.keys, dim=-1).t()
        group = model.group_pool.prompts[similarity.topk(model.cfg.top_k, dim=-1).indices].mean(dim=1)
        feature = run(group)
    return F.normalize(feature, dim=-1) @ F.normalize(model.head.weight, dim=-1).t()


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_logits_equal_the_literal_full_sequence_model(micro_vit, phase: str) -> None:
    """Prompts as keys/values only, block-K reuse and the class-token-only last block change no logit."""
    model = _model(micro_vit).eval()
    with torch.no_grad():
        model.shared_prompt.tokens.normal_()
        model.group_pool.prompts.normal_()
        images = _images()
        torch.testing.assert_close(model(images, phase).logits, _literal_logits(model, images, phase),
                                   atol=1e-5, rtol=1e-5)


def test_group_prompts_change_phase2_logits(micro_vit) -> None:
    model = _model(micro_vit).eval()
    images = _images()
    before = model(images, "phase2").logits
    with torch.no_grad():
        model.group_pool.prompts.normal_()
    assert not torch.allclose(model(images, "phase2").logits, before, atol=1e-4)


def test_concat_sees_both_prompts_mean_averages_them(micro_vit) -> None:
    """With identical prompts in the pool, mean == one prompt, concat == that prompt twice (differs from mean)."""
    mean = _model(micro_vit, ensemble="mean").eval()
    concat = _model(micro_vit, ensemble="concat").eval()
    concat.load_state_dict(mean.state_dict())
    with torch.no_grad():
        shared = torch.randn(1, DEPTH - mean.block_k, P, DIM)
        mean.group_pool.prompts.copy_(shared.expand(M, -1, -1, -1))
        concat.group_pool.prompts.copy_(shared.expand(M, -1, -1, -1))
    images = _images()
    single = _model(micro_vit, ensemble="mean", top_k=1).eval()
    single.load_state_dict(mean.state_dict())
    torch.testing.assert_close(mean(images, "phase2").logits, single(images, "phase2").logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(concat(images, "phase2").logits, mean(images, "phase2").logits, atol=1e-4)


# --- gradient routing ----------------------------------------------------------------------------------------------

def _losses(model: LPTModel, phase: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(_images(), phase)
    labels = torch.arange(6) % NUM_CLASSES
    return F.cross_entropy(20 * out.logits, labels), matching_loss(out.topk_sim)


@pytest.mark.parametrize("reuse", [True, False])
def test_phase2_gradient_routing(micro_vit, reuse: bool) -> None:
    model = _model(micro_vit, reuse_block_k=reuse)
    model.set_trainable("phase2")
    model.train()
    pool = model.group_pool

    cls_loss, _ = _losses(model, "phase2")
    cls_loss.backward()
    assert _grad_is_zero(pool.keys), "keys must get gradient from the matching loss only"
    assert not _grad_is_zero(pool.prompts) and not _grad_is_zero(model.head.weight)

    _zero_grads(model)
    _, match_loss = _losses(model, "phase2")
    match_loss.backward()
    assert not _grad_is_zero(pool.keys)
    assert _grad_is_zero(pool.prompts), "group prompts must get gradient from the classification loss only"
    assert _grad_is_zero(model.head.weight)

    _zero_grads(model)
    cls_loss, match_loss = _losses(model, "phase2")
    (cls_loss + match_loss).backward()
    assert model.shared_prompt.tokens.grad is None, "phase 2 keeps the shared prompt frozen"
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not _grad_is_zero(pool.keys) and not _grad_is_zero(pool.prompts)


@pytest.mark.parametrize("reuse", [True, False])
def test_joint_mode_trains_the_shared_prompt(micro_vit, reuse: bool) -> None:
    model = _model(micro_vit, reuse_block_k=reuse)
    model.set_trainable("joint")
    model.train()
    cls_loss, match_loss = _losses(model, "joint")
    cls_loss.backward()
    grad = model.shared_prompt.tokens.grad
    assert grad is not None
    # every block's shared prompt gets gradient, blocks 1..K through the (reused or recomputed) block-K tokens
    assert all(grad[i].abs().sum() > 0 for i in range(DEPTH))
    assert _grad_is_zero(model.group_pool.keys)
    assert all(p.grad is None for p in model.backbone.parameters())


def test_phase1_gradient_reaches_shared_prompt_and_head_only(micro_vit) -> None:
    model = _model(micro_vit)
    model.set_trainable("phase1")
    model.train()
    out = model(_images(), "phase1")
    F.cross_entropy(20 * out.logits, torch.arange(6) % NUM_CLASSES).backward()
    assert not _grad_is_zero(model.shared_prompt.tokens) and not _grad_is_zero(model.head.weight)
    assert model.group_pool.keys.grad is None and model.group_pool.prompts.grad is None
    assert all(p.grad is None for p in model.backbone.parameters())


def test_run_phase_leaves_backbone_bit_identical(make_config: Callable[..., LPTConfig], phase1_checkpoint: Path,
                                                 micro_vit_file: Path, monkeypatch, tmp_path: Path,
                                                 quiet_hooks) -> None:
    from safetensors.torch import load_file

    source = load_file(str(micro_vit_file))
    created = []

    def capture(cfg):
        backbone = real_create(cfg)
        created.append(backbone)
        return backbone

    real_create = train_module.create_backbone
    monkeypatch.setattr(train_module, "create_backbone", capture)
    cfg = make_config({"phase2": {"weight_decay": 0.5}})
    train_module.run_stage(cfg, "phase2", tmp_path, quiet_hooks, init_from=phase1_checkpoint)
    (backbone,) = created
    state = backbone.state_dict()
    assert set(state) == set(source)
    for name, tensor in source.items():
        assert torch.equal(state[name], tensor), name
    assert all(p.grad is None for p in backbone.parameters())
