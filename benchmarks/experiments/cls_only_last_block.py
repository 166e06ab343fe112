"""Local experiment behind a proposed lpt_core change: run the last ViT block for the class token only.

The feature LPT classifies (and the phase-2 query) is the final CLS token after the final LayerNorm, so the last
block needs the keys and values of every token but the query, attention output, projection and MLP of one row.
This script patches an LPTModel instance (not the package) with that variant, checks its logits against the
unpatched model, and times both phase-2 steps and the naive reference interleaved in one process:

    python benchmarks/experiments/cls_only_last_block.py [--shape vit_s] [--per-branch 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.flops import count_flops  # noqa: E402
from benchmarks.naive_reference import NaivePhase2  # noqa: E402
from benchmarks.steps import DualStep, build_model, lpt_step, random_batch  # noqa: E402
from benchmarks.timing import Stats, interleaved, ratios  # noqa: E402
from lpt_core.model import LPTModel  # noqa: E402
from lpt_core.prompts import _prompt_keys_values  # noqa: E402


def cls_only_block(block, x: Tensor, prompts: Tensor | None) -> Tensor:
    """prompted_block restricted to the class token's output: [B, N, D] -> [B, 1, D]."""
    attn = block.attn
    h = block.norm1(x)
    b, n, d = h.shape
    dim = attn.attn_dim
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], w[:dim], None if bias is None else bias[:dim])  # [B, 1, D]
    kv = F.linear(h, w[dim:], None if bias is None else bias[dim:])  # [B, N, 2D]
    heads = lambda t: t.reshape(b, t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    k, v = kv.split(dim, dim=-1)
    q, k, v = attn.q_norm(heads(q)), attn.k_norm(heads(k)), heads(v)
    if prompts is not None and prompts.shape[-2] > 0:
        k_p, v_p = _prompt_keys_values(attn, block.norm1(prompts if prompts.dim() == 3 else prompts.unsqueeze(0)))
        if k_p.shape[0] != b:
            k_p, v_p = k_p.expand(b, -1, -1, -1), v_p.expand(b, -1, -1, -1)
        k, v = torch.cat([k, k_p.to(k.dtype)], dim=2), torch.cat([v, v_p.to(v.dtype)], dim=2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, dim)
    out = attn.proj(attn.norm(out))
    x0 = x[:, :1] + block.ls1(out)
    return x0 + block.ls2(block.mlp(block.norm2(x0)))


def patch(model: LPTModel) -> LPTModel:
    """Makes `model.run_blocks` run its final block (index L - 1) for the class token only."""
    original = LPTModel.run_blocks
    last = len(model.backbone.blocks) - 1

    def run_blocks(self, x, start, end, group=None):
        if end <= last:
            return original(self, x, start, end, group)
        x = original(self, x, start, last, group)
        prompts = self.shared_prompt(last) if self.shared_prompt is not None else None
        if group is not None and last >= self.block_k:
            r = group[:, last - self.block_k]
            prompts = r if prompts is None else torch.cat([prompts.expand(r.shape[0], -1, -1), r], dim=1)
        return cls_only_block(self.backbone.blocks[last], x, prompts)

    model.run_blocks = types.MethodType(run_blocks, model)
    return model


def print_flops(phase: str, steps: dict, unit) -> None:
    flops = {name: count_flops(lambda s=s: s(unit)) / unit.size / 1e9 for name, s in steps.items()}
    print(f"{phase} GFLOP/image: " + ", ".join(f"{name} {f:.3g}" for name, f in flops.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="vit_s")
    parser.add_argument("--per-branch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    current, candidate = build_model(args.shape, device), patch(build_model(args.shape, device))
    batch = random_batch(args.shape, args.per_branch, device)
    current.eval(), candidate.eval()
    with torch.no_grad():
        for phase in ("phase1", "phase2"):
            diff = (current(batch.images, phase).logits - candidate(batch.images, phase).logits).abs().max().item()
            print(f"{phase}: max |logit difference| current vs CLS-only last block = {diff:.2e}")
    naive = NaivePhase2(build_model(args.shape, device))
    steps = {"current": lpt_step(current, "phase2", device), "cls_only": lpt_step(candidate, "phase2", device),
             "naive": DualStep(naive, naive.lpt.set_trainable("phase2"), device)}
    naive.lpt.train()
    unit = random_batch(args.shape, 1, device)
    print_flops("phase2", steps, unit)
    print_flops("phase1", {"current": lpt_step(current, "phase1", device),
                           "cls_only": lpt_step(candidate, "phase1", device)}, unit)
    for model in (current, candidate):  # back to the phase-2 parameters the timed steps optimise
        model.set_trainable("phase2")
    samples = interleaved({name: (lambda s=s: s(batch)) for name, s in steps.items()}, args.repeats, warmup=1)
    for name, secs in samples.items():
        print(f"{name:9s} {Stats.of(secs).fmt()} s/step")
    print(f"speed-up cls_only / current: {Stats.of(ratios(samples['current'], samples['cls_only'])).fmt_ratio()}")
    print(f"vs naive: current {Stats.of(ratios(samples['naive'], samples['current'])).fmt_ratio()}, "
          f"cls_only {Stats.of(ratios(samples['naive'], samples['cls_only'])).fmt_ratio()}")


if __name__ == "__main__":
    main()
