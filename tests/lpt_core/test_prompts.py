"""Prompt layers: the prompted block against the literal "append, run the timm block, drop" reference, and the pool."""
from __future__ import annotations

import math

import pytest
import torch
from timm.layers import Attention, LayerNorm
from timm.models.vision_transformer import Block
from torch import nn

from lpt_core.prompts import GroupPromptPool, SharedPrompt, check_block_supported, prompted_block

DIM, HEADS, TOKENS, BATCH, P = 32, 4, 7, 3, 5


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (norm weights and biases too), so no term of the block is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            centre = 1.0 if p.ndim == 1 and (name.endswith("weight") or name.endswith("gamma")) else 0.0
            p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def _reference(block: Block, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """lpt-method.md: append the prompt tokens to the sequence, run the block as is, drop the prompt outputs."""
    if prompts.dim() == 2:
        prompts = prompts.expand(x.shape[0], -1, -1)
    return block(torch.cat([x, prompts], dim=1))[:, : x.shape[1]]


BLOCKS = {
    "qkv_bias": dict(qkv_bias=True),
    "no_qkv_bias": dict(qkv_bias=False),
    "qk_norm": dict(qkv_bias=True, qk_norm=True),
    "qk_norm_no_bias": dict(qkv_bias=False, qk_norm=True),
    "layer_scale_and_scale_norm": dict(qkv_bias=True, init_values=0.5, scale_attn_norm=True),
}


def _block(kwargs: dict, seed: int = 0) -> Block:
    return _randomize(Block(DIM, HEADS, **kwargs), seed)


@pytest.mark.parametrize("per_image", [False, True], ids=["shared_PD", "per_image_BPD"])
@pytest.mark.parametrize("kwargs", list(BLOCKS.values()), ids=list(BLOCKS))
def test_prompted_block_equals_append_run_drop(kwargs: dict, per_image: bool) -> None:
    block = _block(kwargs)
    x = torch.randn(BATCH, TOKENS, DIM)
    prompts = torch.randn(BATCH, P, DIM) if per_image else torch.randn(P, DIM)
    out = prompted_block(block, x, prompts)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _reference(block, x, prompts), atol=1e-5, rtol=1e-5)


def test_prompted_block_gated_attention() -> None:
    block = Block(DIM, HEADS, qkv_bias=True)
    block.attn = Attention(DIM, HEADS, qkv_bias=True, qk_norm=True, gated=True, norm_layer=LayerNorm)
    _randomize(block, 3)
    x, prompts = torch.randn(BATCH, TOKENS, DIM), torch.randn(BATCH, P, DIM)
    torch.testing.assert_close(prompted_block(block, x, prompts), _reference(block, x, prompts), atol=1e-5, rtol=1e-5)


def test_prompted_block_prompts_change_the_output_and_per_image_prompts_stay_per_image() -> None:
    block = _block(BLOCKS["qkv_bias"])
    x = torch.randn(BATCH, TOKENS, DIM)
    prompts = torch.randn(BATCH, P, DIM)
    out = prompted_block(block, x, prompts)
    assert not torch.allclose(out, block(x), atol=1e-3)
    # changing image 0's prompt changes only image 0's output
    changed = prompts.clone()
    changed[0] = torch.randn(P, DIM)  # (a constant shift would vanish in norm1)
    out2 = prompted_block(block, x, changed)
    assert not torch.allclose(out2[0], out[0], atol=1e-4)
    torch.testing.assert_close(out2[1:], out[1:])


def test_prompted_block_without_prompts_is_the_plain_block() -> None:
    block = _block(BLOCKS["qk_norm"])
    x = torch.randn(BATCH, TOKENS, DIM)
    torch.testing.assert_close(prompted_block(block, x, None), block(x))
    torch.testing.assert_close(prompted_block(block, x, torch.empty(0, DIM)), block(x))


def test_prompted_block_gradient_reaches_prompts_only_through_keys_values() -> None:
    block = _block(BLOCKS["qkv_bias"])
    x = torch.randn(BATCH, TOKENS, DIM)
    prompts = torch.randn(P, DIM, requires_grad=True)
    ref_prompts = prompts.detach().clone().requires_grad_(True)
    prompted_block(block, x, prompts).square().sum().backward()
    _reference(block, x, ref_prompts).square().sum().backward()
    torch.testing.assert_close(prompts.grad, ref_prompts.grad, atol=1e-4, rtol=1e-4)


PROMPTS = {
    "none": lambda: None,
    "shared_PD": lambda: torch.randn(P, DIM),
    "per_image_BPD": lambda: torch.randn(BATCH, P, DIM),
}


@pytest.mark.parametrize("prompts", list(PROMPTS), ids=list(PROMPTS))
@pytest.mark.parametrize("kwargs", list(BLOCKS.values()), ids=list(BLOCKS))
def test_cls_only_block_is_the_class_token_row_of_the_full_block(kwargs: dict, prompts: str) -> None:
    block = _block(kwargs, seed=5)
    x, p = torch.randn(BATCH, TOKENS, DIM), PROMPTS[prompts]()
    full = block(x) if p is None else _reference(block, x, p)
    out = prompted_block(block, x, p, cls_only=True)
    assert out.shape == (BATCH, 1, DIM)
    torch.testing.assert_close(out, full[:, :1], atol=1e-5, rtol=1e-5)


def test_cls_only_gated_attention() -> None:
    block = Block(DIM, HEADS, qkv_bias=True)
    block.attn = Attention(DIM, HEADS, qkv_bias=True, qk_norm=True, gated=True, norm_layer=LayerNorm)
    _randomize(block, 4)
    x, prompts = torch.randn(BATCH, TOKENS, DIM), torch.randn(BATCH, P, DIM)
    out = prompted_block(block, x, prompts, cls_only=True)
    torch.testing.assert_close(out, _reference(block, x, prompts)[:, :1], atol=1e-5, rtol=1e-5)


def test_cls_only_gradients_equal_the_full_blocks() -> None:
    """Input and prompt gradients of a class-token loss are those of the full block (the other rows had none)."""
    block = _block(BLOCKS["qk_norm"], seed=6)
    x = torch.randn(BATCH, TOKENS, DIM, requires_grad=True)
    prompts = torch.randn(BATCH, P, DIM, requires_grad=True)
    prompted_block(block, x, prompts, cls_only=True)[:, 0].square().sum().backward()
    x_ref, p_ref = x.detach().clone().requires_grad_(True), prompts.detach().clone().requires_grad_(True)
    _reference(block, x_ref, p_ref)[:, 0].square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prompts.grad, p_ref.grad, atol=1e-4, rtol=1e-4)


def test_check_block_supported_refuses_other_blocks() -> None:
    check_block_supported(Block(DIM, HEADS))
    with pytest.raises(ValueError, match="Linear"):
        check_block_supported(nn.Linear(DIM, DIM))
    block = Block(DIM, HEADS)
    block.attn = nn.Identity()
    with pytest.raises(ValueError, match="Identity"):
        check_block_supported(block)


# --- SharedPrompt / GroupPromptPool -----------------------------------------------------------------------------

def test_shared_prompt_shape_and_init() -> None:
    torch.manual_seed(0)
    shared = SharedPrompt(num_blocks=12, length=10, dim=64, init_std=0.02)
    assert shared.tokens.shape == (12, 10, 64)
    assert shared(3).shape == (10, 64)
    assert shared(3).data_ptr() == shared.tokens[3].data_ptr()
    assert 0.015 < shared.tokens.std().item() < 0.025


def test_pool_shapes() -> None:
    pool = GroupPromptPool(pool_size=5, num_blocks=3, length=2, dim=8)
    assert pool.keys.shape == (5, 8)
    assert pool.prompts.shape == (5, 3, 2, 8)


def test_match_top_k_by_cosine_hand_example() -> None:
    pool = GroupPromptPool(pool_size=3, num_blocks=1, length=1, dim=2)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]]))  # norms differ: cosine ignores them
    query = torch.tensor([[1.0, 0.1], [0.0, -1.0], [-1.0, 1.0]])
    idx, sim = pool.match(query, top_k=2)
    # query 0: cos = 1/sqrt(1.01), 0.1/sqrt(1.01), 1.1/(sqrt(1.01) sqrt(2)) -> keys 0, 2
    # query 1: cos = 0, -1, -1/sqrt(2)                                 -> keys 0, 2
    # query 2: cos = -1/sqrt(2), 1/sqrt(2), 0                          -> keys 1, 2
    assert idx.tolist() == [[0, 2], [0, 2], [1, 2]]
    r = math.sqrt(1.01)
    expected = torch.tensor([[1 / r, 1.1 / (r * math.sqrt(2))], [0.0, -1 / math.sqrt(2)], [1 / math.sqrt(2), 0.0]])
    torch.testing.assert_close(sim, expected)


def test_match_similarities_carry_gradient_to_the_keys_only() -> None:
    pool = GroupPromptPool(pool_size=4, num_blocks=2, length=2, dim=6)
    query = torch.randn(3, 6, requires_grad=True)
    idx, sim = pool.match(query.detach(), top_k=2)
    sim.sum().backward()
    assert pool.keys.grad is not None and pool.keys.grad.abs().sum() > 0
    assert pool.prompts.grad is None
    assert query.grad is None
    # only the matched keys receive gradient
    unmatched = sorted(set(range(4)) - set(idx.flatten().tolist()))
    for j in unmatched:
        assert pool.keys.grad[j].abs().sum() == 0


def test_select_mean_and_concat_hand_values() -> None:
    m, blocks, length, dim = 3, 2, 2, 4
    pool = GroupPromptPool(pool_size=m, num_blocks=blocks, length=length, dim=dim)
    with torch.no_grad():
        pool.prompts.copy_(torch.arange(m * blocks * length * dim, dtype=torch.float32).view(m, blocks, length, dim))
    idx = torch.tensor([[0, 2], [1, 1]])
    r = pool.prompts.detach()

    mean = pool.select(idx, "mean")
    assert mean.shape == (2, blocks, length, dim)
    torch.testing.assert_close(mean[0], (r[0] + r[2]) / 2)
    torch.testing.assert_close(mean[1], r[1])

    concat = pool.select(idx, "concat")
    assert concat.shape == (2, blocks, 2 * length, dim)
    for b in range(blocks):
        # per block: the P tokens of the first match, then the P tokens of the second
        torch.testing.assert_close(concat[0, b], torch.cat([r[0, b], r[2, b]]))
        torch.testing.assert_close(concat[1, b], torch.cat([r[1, b], r[1, b]]))


def test_select_unknown_ensemble_raises() -> None:
    pool = GroupPromptPool(pool_size=2, num_blocks=1, length=1, dim=2)
    with pytest.raises(ValueError, match="ensemble"):
        pool.select(torch.tensor([[0]]), "sum")


def test_select_gradient_reaches_only_selected_prompts() -> None:
    pool = GroupPromptPool(pool_size=4, num_blocks=2, length=2, dim=3)
    pool.select(torch.tensor([[0, 3]]), "mean").sum().backward()
    grad = pool.prompts.grad
    torch.testing.assert_close(grad[0], torch.full_like(grad[0], 0.5))
    torch.testing.assert_close(grad[3], torch.full_like(grad[3], 0.5))
    assert grad[1].abs().sum() == 0 and grad[2].abs().sum() == 0
    assert pool.keys.grad is None
