"""Prompt layers: the shared VPT-Deep prompt, the keyed pool of group prompts, and the prompted block.

Prompt tokens act only as keys and values: the block's queries are the image tokens alone, so no attention is
computed for prompt positions and their outputs never exist. This equals "append the prompts, run the block,
drop their outputs" (tests/lpt_core/test_prompts.py proves it) at a fraction of the cost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn


class SharedPrompt(nn.Module):
    """u = [u_1..u_L]: P tokens per block, shared by every image (phase 1)."""

    def __init__(self, num_blocks: int, length: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_blocks, length, dim))  # [L, P, D]
        trunc_normal_(self.tokens, std=init_std)

    def forward(self, block: int) -> Tensor:
        return self.tokens[block]  # [P, D]


class GroupPromptPool(nn.Module):
    """R = {(k_j, r^j)}: m keys of width D, each owning P tokens for each of the last L - K blocks (phase 2)."""

    def __init__(self, pool_size: int, num_blocks: int, length: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.empty(pool_size, dim))  # [m, D]
        self.prompts = nn.Parameter(torch.empty(pool_size, num_blocks, length, dim))  # [m, L-K, P, D]
        trunc_normal_(self.keys, std=init_std)
        trunc_normal_(self.prompts, std=init_std)

    def match(self, query: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
        """Top-k keys by cosine similarity; the similarities carry the keys' only gradient (matching loss)."""
        similarity = F.normalize(query.float(), dim=-1) @ F.normalize(self.keys.float(), dim=-1).t()  # [B, m]
        topk_sim, topk_idx = similarity.topk(top_k, dim=-1)  # [B, k]
        return topk_idx, topk_sim

    def select(self, topk_idx: Tensor, ensemble: str) -> Tensor:
        """Per-image group prompt from the k matched ones: mean -> [B, L-K, P, D], concat -> [B, L-K, k*P, D]."""
        chosen = self.prompts[topk_idx]  # [B, k, L-K, P, D]
        if ensemble == "mean":
            return chosen.mean(dim=1)
        if ensemble == "concat":
            b, k, blocks, length, dim = chosen.shape
            return chosen.permute(0, 2, 1, 3, 4).reshape(b, blocks, k * length, dim)
        raise ValueError(f"prompt.ensemble={ensemble!r}: expected 'mean' or 'concat'")


def _heads(x: Tensor, num_heads: int, head_dim: int) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], num_heads, head_dim).transpose(1, 2)  # [B, H, N, hd]


def _prompt_keys_values(attn: Attention, prompts: Tensor) -> tuple[Tensor, Tensor]:
    """K and V of the (already normed) prompt tokens, using only the key/value rows of the block's qkv weights."""
    dim = attn.attn_dim
    bias = attn.qkv.bias[dim:] if attn.qkv.bias is not None else None
    kv = F.linear(prompts, attn.qkv.weight[dim:], bias)  # [Bp, P, 2 * D]
    k, v = kv.split(dim, dim=-1)
    k = attn.k_norm(_heads(k, attn.num_heads, attn.head_dim))
    return k, _heads(v, attn.num_heads, attn.head_dim)


def _queries_keys_values(attn: Attention, h: Tensor, cls_only: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K, V in heads layout. cls_only: queries for the class token alone (one third of the qkv GEMM's rows
    spared for every other token), keys and values for all tokens."""
    b, n, _ = h.shape
    if not cls_only:
        q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    dim, weight, bias = attn.attn_dim, attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], weight[:dim], bias[:dim] if bias is not None else None)  # [B, 1, D]
    k, v = F.linear(h, weight[dim:], bias[dim:] if bias is not None else None).split(dim, dim=-1)
    return tuple(_heads(t, attn.num_heads, attn.head_dim) for t in (q, k, v))


def prompted_block(block: Block, x: Tensor, prompts: Tensor | None, cls_only: bool = False) -> Tensor:
    """One pre-norm ViT block whose keys/values are [x, prompts] and whose queries are x.

    x: [B, N, D] image tokens (class token first); prompts: [P, D] shared by the batch or [B, P, D] per image.
    cls_only (the last block, whose only consumer is the classifier's class token): the attention queries, the
    projection and the MLP run for the class token alone and the result is [B, 1, D]; the output of the other
    tokens would be computed, back-propagated through and thrown away.
    """
    if (prompts is None or prompts.shape[-2] == 0) and not cls_only:
        return block(x)
    attn: Attention = block.attn
    h = block.norm1(x)
    b = h.shape[0]
    q, k, v = _queries_keys_values(attn, h, cls_only)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prompts is not None and prompts.shape[-2] > 0:
        k_p, v_p = _prompt_keys_values(attn, block.norm1(prompts if prompts.dim() == 3 else prompts.unsqueeze(0)))
        k_p, v_p = k_p.to(k.dtype), v_p.to(v.dtype)
        if k_p.shape[0] != b:  # one prompt for the whole batch: broadcast without copying
            k_p, v_p = k_p.expand(b, -1, -1, -1), v_p.expand(b, -1, -1, -1)
        k, v = torch.cat([k, k_p], dim=2), torch.cat([v, v_p], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    n = q.shape[2]
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim))
    if attn.gate is not None:
        out = out * attn.gate(h[:, :n]).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    x = x[:, :n] + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def check_block_supported(block: nn.Module) -> None:
    """The prompted block re-uses timm's Block/Attention weights by attribute name: refuse anything else."""
    if not isinstance(block, Block) or not isinstance(block.attn, Attention):
        raise ValueError(
            f"prompted blocks need timm's vision_transformer.Block with layers.Attention, got "
            f"{type(block).__name__}/{type(getattr(block, 'attn', None)).__name__}"
        )
