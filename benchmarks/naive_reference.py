"""The naive phase-2 forward that the authors' code performs, written here from its description (lpt-method.md):

1. a full query pass: patch embedding and all L blocks with the shared prompt (no gradient), final CLS -> query;
2. match the query against the pool keys, average the top-k group prompts (the same pool code as LPTModel);
3. a full prompted pass from the patch embedding again: in every block the prompt tokens (shared u_i, and
   [u_i, r_{i-K}] from block K+1 on) are appended to the token sequence as real tokens, so they act as queries
   too; attention is computed by hand, softmax(q k^T * scale) v; after the block their outputs are dropped.

It borrows every weight from an `LPTModel` (the timm blocks, the shared prompt, the pool and the classifier), so
its logits must equal LPTModel's phase-2 logits in eval mode, and a training step on it updates the very same
trainable tensors. Only the work differs: L + L blocks instead of L + (L - K) + reuse, P' extra query rows per
block, and an explicit [B, H, N', N'] attention matrix instead of a fused kernel.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from lpt_core.model import LPTModel, LPTOutput


def manual_attention(block: Block, h: Tensor) -> Tensor:
    """The block's self-attention over every row of h [B, N', D], with the attention matrix materialised."""
    attn = block.attn
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, H, N', hd] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # [B, H, N', N']
    weights = attn.attn_drop(weights)
    out = (weights @ v).transpose(1, 2).reshape(b, n, attn.attn_dim)
    out = attn.norm(out)
    return attn.proj_drop(attn.proj(out))


def appended_prompt_block(block: Block, x: Tensor, prompts: Tensor) -> Tensor:
    """x [B, N, D] with prompts [B, P', D] appended as tokens; the block runs on all N + P' rows, then the
    prompt rows are dropped."""
    n = x.shape[1]
    t = torch.cat([x, prompts.to(x.dtype)], dim=1)  # [B, N + P', D]
    t = t + block.drop_path1(block.ls1(manual_attention(block, block.norm1(t))))
    t = t + block.drop_path2(block.ls2(block.mlp(block.norm2(t))))
    return t[:, :n]


class NaivePhase2(nn.Module):
    """Phase-2 forward of the authors' code over an LPTModel's weights (decoupled phase 2, ensemble=mean)."""

    def __init__(self, lpt: LPTModel) -> None:
        super().__init__()
        if lpt.shared_prompt is None or lpt.cfg.query != "phase1":
            raise ValueError("NaivePhase2 reproduces the default setting: shared prompt and phase-1 query")
        self.lpt = lpt

    def _prompts(self, block: int, batch: int, group: Tensor | None) -> Tensor:
        prompts = self.lpt.shared_prompt(block).expand(batch, -1, -1)  # [B, P, D]
        if group is not None and block >= self.lpt.block_k:
            prompts = torch.cat([prompts, group[:, block - self.lpt.block_k]], dim=1)  # [B, 2P, D]
        return prompts

    def features(self, images: Tensor, group: Tensor | None) -> Tensor:
        """Final CLS after the final LayerNorm, from the patch embedding through all L blocks."""
        x = self.lpt.embed(images)  # [B, 1 + N, D]
        for i, block in enumerate(self.lpt.backbone.blocks):
            x = appended_prompt_block(block, x, self._prompts(i, x.shape[0], group))
        return self.lpt.backbone.norm(x)[:, 0]

    def query(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.features(images, None)  # [B, D]

    def forward(self, images: Tensor) -> LPTOutput:
        query = self.query(images)
        pool = self.lpt.group_pool
        topk_idx, topk_sim = pool.match(query, self.lpt.cfg.top_k)
        group = pool.select(topk_idx, self.lpt.cfg.ensemble)  # [B, L - K, P, D]
        feature = self.features(images, group)
        return LPTOutput(logits=self.lpt.classify(feature), query=query, topk_idx=topk_idx, topk_sim=topk_sim)
