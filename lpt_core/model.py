"""LPTModel: prompts and a cosine classifier composed around a frozen timm ViT it neither subclasses nor copies.

Phase 1 trains the shared prompt u and the classifier. Phase 2 freezes u, matches each image's phase-1 query
against the pool keys, and runs blocks K+1..L again with [u_i, r_{i-K}] as extra keys/values. Blocks 1..K of that
second pass see exactly what the query pass saw, so their output (block_k_tokens) is reused, not recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lpt_core.config import ConfigError, PromptConfig
from lpt_core.prompts import GroupPromptPool, SharedPrompt, check_block_supported, prompted_block

TRAINABLE = {
    "phase1": ("shared_prompt", "head"),
    "phase2": ("group_pool", "head"),
    "joint": ("shared_prompt", "group_pool", "head"),
}
# What a stage's checkpoint holds: what it trains, what its evaluation runs (phase 2 runs the frozen u) and what the
# next stage inherits (phase 2 starts from phase 1's u and classifier). Never more: a phase-1 stage is shared by
# every pool size, so a pool in its checkpoint would be [m, ...] of whichever trial happened to train it.
STAGE_PARTS = {
    "phase1": ("shared_prompt", "head"),
    "phase2": ("shared_prompt", "group_pool", "head"),
    "joint": ("shared_prompt", "group_pool", "head"),
}


class CosineClassifier(nn.Module):
    """f_c = cos(feature, w_c), no bias, in [-1, 1]; the loss applies the scale s."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))  # [C, D]
        trunc_normal_(self.weight, std=0.02)

    def forward(self, feature: Tensor) -> Tensor:
        return F.normalize(feature.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()  # [B, C]


@dataclass
class LPTOutput:
    logits: Tensor  # [B, C] cosine logits
    query: Tensor  # [B, D] the matching query (phase 2) or the phase-1 feature, detached
    topk_idx: Tensor | None = None  # [B, k]
    topk_sim: Tensor | None = None  # [B, k], differentiable w.r.t. the keys only


@dataclass
class RowFeatures:
    """One fused row's phase-2 forward up to its classifier (which runs per row, after its own RNG state is set)."""

    feature: Tensor  # [B, D] final CLS
    query: Tensor  # [B, D] detached
    topk_idx: Tensor  # [B, k]
    topk_sim: Tensor  # [B, k]

    def output(self, logits: Tensor) -> LPTOutput:
        return LPTOutput(logits=logits, query=self.query, topk_idx=self.topk_idx, topk_sim=self.topk_sim)


class LPTModel(nn.Module):
    def __init__(self, backbone: VisionTransformer, num_classes: int, cfg: PromptConfig) -> None:
        super().__init__()
        for block in backbone.blocks:
            check_block_supported(block)
        depth, dim = len(backbone.blocks), backbone.embed_dim
        self.block_k = depth // 2 if cfg.block_k is None else cfg.block_k
        if not 0 <= self.block_k < depth:
            raise ConfigError(f"prompt.block_k={self.block_k}: K must be in [0, L={depth}) for {depth} blocks")
        self.cfg = cfg
        self.backbone = backbone.requires_grad_(False).eval()
        # creation order matters: the pool comes last so that phase-1 tensors never depend on pool settings
        self.shared_prompt = SharedPrompt(depth, cfg.length, dim, cfg.init_std) if cfg.shared else None
        self.head = CosineClassifier(dim, num_classes)
        self.group_pool = GroupPromptPool(cfg.pool_size, depth - self.block_k, cfg.length, dim, cfg.init_std)
        self.dropout = nn.Dropout(cfg.head_dropout)

    def train(self, mode: bool = True) -> LPTModel:
        """The frozen backbone stays in eval mode whatever the trainer asks (no dropout, no drop-path)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def _parts(self, names: tuple[str, ...]) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def trained_parameters(self, stage: str) -> dict[str, nn.Parameter]:
        """The parameters `stage` trains, by state-dict name, in the order the optimizer holds them."""
        return {f"{part}.{name}": p for part, module in self._parts(TRAINABLE[stage]).items()
                for name, p in module.named_parameters()}

    def set_trainable(self, stage: str) -> list[nn.Parameter]:
        """Freezes everything but the phase's trainable parts and returns their parameters (for the optimizer)."""
        self.requires_grad_(False)
        params = list(self.trained_parameters(stage).values())
        for p in params:
            p.requires_grad_(True)
        return params

    def embed(self, images: Tensor) -> Tensor:
        vit = self.backbone
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))  # [B, 1 + N, D]

    def run_blocks(self, x: Tensor, start: int, end: int, group: Tensor | None = None) -> Tensor:
        """Blocks start..end-1 with the shared prompt and, from block K on, the per-image group prompt.

        A run that ends at the last block returns the class token alone ([B, 1, D]): nothing reads the others.
        """
        last = len(self.backbone.blocks) - 1
        for i in range(start, end):
            prompts = self.shared_prompt(i) if self.shared_prompt is not None else None
            if group is not None and i >= self.block_k:
                r = group[:, i - self.block_k]  # [B, P', D]
                prompts = r if prompts is None else torch.cat([prompts.expand(r.shape[0], -1, -1), r], dim=1)
            x = prompted_block(self.backbone.blocks[i], x, prompts, cls_only=i == last)
        return x

    def cls_feature(self, x: Tensor) -> Tensor:
        return self.backbone.norm(x)[:, 0]  # [B, D] final CLS after the final LayerNorm

    def classify(self, feature: Tensor) -> Tensor:
        return self.head(self.dropout(feature))

    def forward_phase1(self, images: Tensor) -> LPTOutput:
        feature = self.cls_feature(self.run_blocks(self.embed(images), 0, len(self.backbone.blocks)))
        return LPTOutput(logits=self.classify(feature), query=feature.detach())

    def pretrained_query(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.backbone.forward_features(images)[:, 0]

    def query_pass(self, images: Tensor, track_block_k: bool) -> tuple[Tensor, Tensor]:
        """Phase-1 path: (block_k_tokens [B, 1+N, D], query [B, D] detached).

        track_block_k keeps the graph of blocks 1..K (joint mode trains u through them); the rest of the query
        pass never needs a graph.
        """
        with torch.set_grad_enabled(track_block_k and torch.is_grad_enabled()):
            block_k_tokens = self.run_blocks(self.embed(images), 0, self.block_k)
        with torch.no_grad():
            query = self.cls_feature(self.run_blocks(block_k_tokens.detach(), self.block_k, len(self.backbone.blocks)))
        return block_k_tokens, query

    def forward_grouped(self, images: Tensor, joint: bool) -> LPTOutput:
        """Phase 2 (joint=False) or joint training: match, select the group prompt, classify."""
        depth = len(self.backbone.blocks)
        if self.cfg.query == "pretrained":
            query, block_k_tokens = self.pretrained_query(images), None
        else:
            block_k_tokens, query = self.query_pass(images, track_block_k=joint and self.cfg.reuse_block_k)
        topk_idx, topk_sim = self.group_pool.match(query, self.cfg.top_k)
        group = self.group_pool.select(topk_idx, self.cfg.ensemble)
        if block_k_tokens is None or not self.cfg.reuse_block_k:
            block_k_tokens = self.run_blocks(self.embed(images), 0, self.block_k)
        feature = self.cls_feature(self.run_blocks(block_k_tokens, self.block_k, depth, group))
        return LPTOutput(logits=self.classify(feature), query=query, topk_idx=topk_idx, topk_sim=topk_sim)

    def forward(self, images: Tensor, stage: str) -> LPTOutput:
        if stage == "phase1":
            return self.forward_phase1(images)
        return self.forward_grouped(images, joint=stage == "joint")

    def trainable_state(self) -> dict[str, Tensor]:
        """Every non-backbone tensor: the parts of all phases (a checkpoint holds `stage_state(stage)` instead)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def stage_state(self, stage: str) -> dict[str, Tensor]:
        """The tensors a checkpoint of `stage` holds (STAGE_PARTS), by state-dict name."""
        return {f"{part}.{name}": t for part, module in self._parts(STAGE_PARTS[stage]).items()
                for name, t in module.state_dict().items()}


def _shared_part(models: Sequence[LPTModel], images: Tensor) -> tuple[dict[int, Tensor], dict[str, Tensor]]:
    """What no fused row trains, once: the tokens after each row's block K (the query pass runs through all of
    them anyway) and the queries by function (phase1 / pretrained), each computed only if a row matches with it."""
    lead = models[0]
    tokens: dict[int, Tensor] = {}
    queries: dict[str, Tensor] = {}
    with torch.no_grad():
        x, start = lead.embed(images), 0
        for cut in sorted({m.block_k for m in models}):
            x = tokens[cut] = lead.run_blocks(x, start, cut)
            start = cut
        if any(m.cfg.query == "phase1" for m in models):
            queries["phase1"] = lead.cls_feature(lead.run_blocks(x, start, len(lead.backbone.blocks)))
    if any(m.cfg.query == "pretrained" for m in models):
        queries["pretrained"] = lead.pretrained_query(images)
    return tokens, queries


def shared_phase2_queries(models: Sequence[LPTModel], images: Tensor) -> list[Tensor]:
    """Each fused row's query [B, D], the query pass run once per query function (the K-NN statistics need no
    more: a phase-2 row's query does not depend on its pool)."""
    _, queries = _shared_part(models, images)
    return [queries[m.cfg.query] for m in models]


def shared_phase2_pass(models: Sequence[LPTModel], images: Tensor) -> list[RowFeatures]:
    """Phase 2 of several rows over one batch, paying once for what none of them trains.

    The rows share one frozen backbone and one frozen shared prompt u (the phase 1 they all start from), so the
    embedding, blocks 1..K and the query pass are the same for every row (`_shared_part`). Each row then matches
    with its own keys and selects its own group prompts; blocks K+1..L run once for all rows whose prompts have the
    same shape, stacked along the batch (one large batch for a GPU), and once per remaining shape. Every op is the
    one `forward_grouped` runs for that row alone; only the batch a matrix product sees is larger.
    """
    tokens, queries = _shared_part(models, images)
    depth = len(models[0].backbone.blocks)
    matched = []
    for m in models:
        topk_idx, topk_sim = m.group_pool.match(queries[m.cfg.query], m.cfg.top_k)
        matched.append((topk_idx, topk_sim, m.group_pool.select(topk_idx, m.cfg.ensemble)))
    stacks: dict[tuple[int, int], list[int]] = {}  # (K, prompt tokens per block) -> rows
    for i, (m, (_, _, group)) in enumerate(zip(models, matched)):
        stacks.setdefault((m.block_k, group.shape[2]), []).append(i)
    features: dict[int, Tensor] = {}
    for (cut, _), rows in stacks.items():
        x = tokens[cut].repeat(len(rows), 1, 1) if len(rows) > 1 else tokens[cut]
        group = torch.cat([matched[i][2] for i in rows]) if len(rows) > 1 else matched[rows[0]][2]
        runner = models[rows[0]]  # its K indexes the group prompts; u and the backbone are every row's
        out = runner.cls_feature(runner.run_blocks(x, cut, depth, group))
        features.update(zip(rows, out.split(len(images))))
    return [RowFeatures(features[i], queries[m.cfg.query], matched[i][0], matched[i][1])
            for i, m in enumerate(models)]
