"""Import of the authors' released full LPT checkpoint (their Places-LT release), to evaluate it with this tool.

Their file is a torch pickle of one state dict (possibly under "state_dict" or "model", keys possibly prefixed
"module.") holding the prompt learner in their names and the timm ViT under some prefix:

    prompt_learner.Prompt_Tokens       [L, P, D]        -> shared_prompt.tokens
    prompt_learner.Prompt_Tokens_pool  [m, L-K, P, D]   -> group_pool.prompts
    prompt_learner.Prompt_Keys         [m, D]           -> group_pool.keys
    prompt_learner.head.weight         [D, C]           -> head.weight, transposed to [C, D]
    <prefix>cls_token, <prefix>blocks.N..., ...      -> backbone.* (the ViT's own classifier head is dropped)

Anything else is ignored and listed in `OfficialCheckpoint.ignored_keys`. Only tensors are ever unpickled
(`safe_torch_load`); `.safetensors` files are read with safetensors.

Their model builds timm's ViT with `norm_layer=nn.LayerNorm`, i.e. torch's LayerNorm eps 1e-5 where timm's own
default is 1e-6; `load_official_into` sets 1e-5 on the model's norms so that it computes their function.
`evaluate_official` is the whole path from the file to the accuracy table (`experiments/run.py evaluate=<file>`).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from lpt_core.metrics import accuracy_report, match_stats, per_class_table
from lpt_core.backbone import create_backbone, norm_eps_values, normalization, set_norm_eps
from lpt_core.checkpoint import CheckpointError, safe_torch_load
from lpt_core.config import LPTConfig
from lpt_core.data import Normalization, build_dataset
from lpt_core.evaluate import evaluate
from lpt_core.model import LPTModel
from lpt_core.runtime import resolve_device

log = logging.getLogger(__name__)

# the authors' prompt-learner tensor names (after its prefix) -> ours
SHARED, POOL, KEYS, HEAD = "Prompt_Tokens", "Prompt_Tokens_pool", "Prompt_Keys", "head.weight"
OURS = {SHARED: "shared_prompt.tokens", POOL: "group_pool.prompts", KEYS: "group_pool.keys", HEAD: "head.weight"}
# a backbone prefix is whatever stands before both of these timm names
BACKBONE_ANCHORS = ("cls_token", "blocks.0.attn.qkv.weight")
NESTED = ("state_dict", "model")
# torch's nn.LayerNorm default, which the authors' ViT uses for every norm (timm's ViT default is 1e-6)
AUTHORS_NORM_EPS = 1e-5
# top-level parameter/module names of timm's VisionTransformer (its classifier "head" deliberately absent)
TIMM_VIT_NAMES = frozenset({"cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre", "blocks", "norm",
                            "fc_norm", "attn_pool"})


@dataclass
class OfficialCheckpoint:
    prompt_overrides: dict[str, int]  # {"length": P, "pool_size": m, "block_k": K}: the PromptConfig to build
    num_classes: int
    depth: int  # L
    dim: int  # D
    model_state: dict[str, Tensor]  # keys exactly as LPTModel.state_dict()
    ignored_keys: list[str]


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err
    return safe_torch_load(path)


def _flat_tensors(raw: Any, path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """The state dict's tensors with "module." stripped, and the names of the non-tensor entries left aside."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(raw).__name__}")
    ignored = []
    for name in NESTED:
        if isinstance(raw.get(name), dict):
            ignored = [k for k in raw if k != name]
            raw = raw[name]
            break
    state = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            ignored.append(str(key))
            continue
        name = str(key)
        while name.startswith("module."):
            name = name[len("module."):]
        state[name] = value
    return state, ignored


def _backbone_prefix(state: dict[str, Tensor], path: Path) -> str:
    """The prefix under which timm's names appear; several identical copies (e.g. a query encoder) are fine."""
    first, second = BACKBONE_ANCHORS
    prefixes = sorted((k[: -len(first)] for k in state if k.endswith(first) and k[: -len(first)] + second in state),
                      key=len)
    if not prefixes:
        raise CheckpointError(f"{path}: no ViT backbone found (no '<prefix>{first}' next to '<prefix>{second}')")
    chosen = _under(state, prefixes[0])
    for other in prefixes[1:]:
        copy = _under(state, other)
        if copy.keys() != chosen.keys() or not all(torch.equal(v, chosen[k]) for k, v in copy.items()):
            raise CheckpointError(f"{path}: two different backbones, under {prefixes[0]!r} and {other!r}")
    return prefixes[0]


def _under(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The timm ViT tensors under `prefix`, prefix stripped, without the ViT's own classifier head."""
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and k[len(prefix):].split(".")[0] in TIMM_VIT_NAMES}


def _split(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], str, list[str]]:
    """(timm backbone tensors, prompt-learner tensors by the authors' short names, their prefix, ignored keys)."""
    shared = [k for k in state if k == SHARED or k.endswith("." + SHARED)]
    if len(shared) != 1:
        raise CheckpointError(f"{path}: expected one '...{SHARED}' tensor (the shared prompt), found {shared}")
    learner = shared[0][: -len(SHARED)]
    prompts = {k[len(learner):]: v for k, v in state.items() if k.startswith(learner) and k[len(learner):] in OURS}
    missing = [learner + name for name in OURS if name not in prompts]
    if missing:
        raise CheckpointError(f"{path}: missing {missing}")
    rest = {k: v for k, v in state.items() if not (k.startswith(learner) and k[len(learner):] in OURS)}
    prefix = _backbone_prefix(rest, path)
    backbone = _under(rest, prefix)
    ignored = [k for k in rest if not (k.startswith(prefix) and k[len(prefix):] in backbone)]
    return backbone, prompts, learner, ignored


def _check(key: str, shape: torch.Size, expected: tuple, meaning: str, path: Path) -> None:
    """expected holds ints and None (any size); the message names the key and both shapes."""
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        wanted = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise CheckpointError(f"{path}: {key} has shape {list(shape)}, expected {wanted} ({meaning})")


def _dims(backbone: dict[str, Tensor], prompts: dict[str, Tensor], learner: str,
          path: Path) -> tuple[int, int, int, int, int, int]:
    """(L, D, P, m, K, C), checking every tensor against the others; errors give the file's own key names."""
    depth = 1 + max(int(m.group(1)) for k in backbone if (m := re.match(r"blocks\.(\d+)\.", k)))
    dim = backbone["cls_token"].shape[-1]
    tokens, pool, keys, head = (prompts[n] for n in (SHARED, POOL, KEYS, HEAD))
    _check(learner + SHARED, tokens.shape, (depth, None, dim),
           f"[L, P, D], the backbone has L={depth} blocks of width {dim}", path)
    length = tokens.shape[1]
    _check(learner + POOL, pool.shape, (None, None, length, dim), f"[m, L-K, P, D] with P={length}, D={dim}", path)
    size, grouped = pool.shape[0], pool.shape[1]
    if not 1 <= grouped <= depth:  # K = L - grouped must lie in [0, L)
        raise CheckpointError(f"{path}: {learner}{POOL} has shape {list(pool.shape)}: L-K={grouped} is not in "
                              f"[1, L={depth}]")
    _check(learner + KEYS, keys.shape, (size, dim), f"[m, D], m={size} from {POOL} {list(pool.shape)}", path)
    _check(learner + HEAD, head.shape, (dim, None), f"[D, C] with D={dim}", path)
    return depth, dim, length, size, depth - grouped, head.shape[1]


def read_official(path: str | Path) -> OfficialCheckpoint:
    """Reads and validates the authors' checkpoint; raises CheckpointError naming the offending key."""
    path = Path(path)
    state, ignored = _flat_tensors(_read_file(path), path)
    backbone, prompts, learner, more_ignored = _split(state, path)
    depth, dim, length, size, block_k, num_classes = _dims(backbone, prompts, learner, path)
    model_state = {f"backbone.{k}": v for k, v in backbone.items()}
    model_state.update({OURS[n]: prompts[n] for n in (SHARED, POOL, KEYS)})
    model_state["head.weight"] = prompts[HEAD].t().contiguous()  # [D, C] -> [C, D]
    ignored = ignored + more_ignored
    if ignored:
        log.info("%s: ignored %d entries: %s", path, len(ignored), ", ".join(ignored))
    return OfficialCheckpoint(
        prompt_overrides={"length": length, "pool_size": size, "block_k": block_k},
        num_classes=num_classes, depth=depth, dim=dim, model_state=model_state, ignored_keys=ignored,
    )


def _overrides_hint(ckpt: OfficialCheckpoint) -> str:
    o = ckpt.prompt_overrides
    return (f"build the model with prompt.length={o['length']} prompt.pool_size={o['pool_size']} "
            f"prompt.block_k={o['block_k']} prompt.shared=true, {ckpt.num_classes} classes and a ViT of "
            f"depth {ckpt.depth}, width {ckpt.dim}")


def _check_model(model: LPTModel, ckpt: OfficialCheckpoint) -> None:
    hint = _overrides_hint(ckpt)
    depth, dim = len(model.backbone.blocks), model.backbone.embed_dim
    if (depth, dim) != (ckpt.depth, ckpt.dim):
        raise CheckpointError(f"backbone: model has depth {depth}, width {dim}; checkpoint depth {ckpt.depth}, "
                              f"width {ckpt.dim}; {hint}")
    blocks = model.backbone.blocks
    norms = [model.backbone.norm] + [getattr(b, name) for b in blocks for name in ("norm1", "norm2")]
    if not all(isinstance(norm, nn.LayerNorm) for norm in norms):
        kinds = sorted({type(norm).__name__ for norm in norms})
        raise CheckpointError(f"backbone: the authors' ViT normalises with LayerNorm (eps {AUTHORS_NORM_EPS}), this "
                              f"one with {kinds}; build it without a norm_layer in backbone.model_kwargs and with "
                              f"backbone.norm_eps={AUTHORS_NORM_EPS}")
    if model.shared_prompt is None:
        raise CheckpointError(f"shared_prompt.tokens: the checkpoint has a shared prompt, the model none; {hint}")
    if model.block_k != ckpt.prompt_overrides["block_k"]:
        raise CheckpointError(f"prompt.block_k: model has K={model.block_k}, checkpoint "
                              f"K={ckpt.prompt_overrides['block_k']}; {hint}")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(ckpt.model_state)), sorted(set(ckpt.model_state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"keys differ: model only {missing[:8]}, checkpoint only {unexpected[:8]} "
                              f"({len(missing)} / {len(unexpected)} in all); {hint}")
    for key in own:
        if own[key].shape != ckpt.model_state[key].shape:
            raise CheckpointError(f"{key}: model has shape {list(own[key].shape)}, checkpoint "
                                  f"{list(ckpt.model_state[key].shape)}; {hint}")


def load_official_into(model: LPTModel, ckpt: OfficialCheckpoint) -> None:
    """Checks that `model` has the checkpoint's shapes, loads every tensor strictly (backbone included) and sets
    the authors' LayerNorm eps on every norm of the backbone, so that `model` computes what their model computes.

    A model built with timm's default eps 1e-6 would change the query, hence possibly the matched prompts, and the
    logits; the change is logged (build with backbone.norm_eps=1e-5 to have it from the start).
    """
    _check_model(model, ckpt)
    model.load_state_dict(ckpt.model_state, strict=True)
    before = norm_eps_values(model.backbone)
    names = set_norm_eps(model.backbone, AUTHORS_NORM_EPS)
    if before != {AUTHORS_NORM_EPS}:
        log.info("set LayerNorm eps %s -> %g on the backbone's %d norms: the authors' model uses torch's default "
                 "(backbone.norm_eps=%g builds it so)", sorted(before), AUTHORS_NORM_EPS, len(names),
                 AUTHORS_NORM_EPS)


@dataclass
class OfficialEvaluation:
    dataset: str
    num_images: int
    prompt: dict[str, Any]  # P, m, K (from the checkpoint), k, ensemble, query (from the config)
    metrics: dict[str, float]  # accuracy_report (both split rules) and the matching statistics
    counts: dict[str, tuple[int, int]]  # "acc", "many", ..., "few_std" -> (correct, images)
    per_class: pa.Table


def evaluate_official(cfg: LPTConfig, path: str | Path, log_line: Callable[[str], None] = print,
                      ) -> OfficialEvaluation:
    """The authors' checkpoint evaluated on `cfg.data`'s eval split, as their model computes it.

    Everything that fixes the function comes from the file: backbone weights (so nothing is downloaded:
    `backbone.pretrained` and `backbone.weights_file` are not used), P, m and K; the architecture is
    `backbone.name` + `model_kwargs`; top-k, ensemble and query come from `cfg.prompt` (defaults: the authors').
    """
    ckpt = read_official(path)
    prompt = dataclasses.replace(cfg.prompt, shared=True, **ckpt.prompt_overrides)
    cfg = dataclasses.replace(cfg, prompt=prompt).validate()
    backbone = create_backbone(dataclasses.replace(cfg.backbone, pretrained=False, weights_file=None))
    device = resolve_device(cfg.device)
    bundle = build_dataset(cfg.data, Normalization(*normalization(backbone)))
    if bundle.num_classes != ckpt.num_classes:
        raise CheckpointError(f"{path}: classifier for {ckpt.num_classes} classes, dataset {bundle.name} has "
                              f"{bundle.num_classes}")
    model = LPTModel(backbone, bundle.num_classes, cfg.prompt)
    load_official_into(model, ckpt)
    summary = {"P": prompt.length, "m": prompt.pool_size, "K": model.block_k, "k": prompt.top_k,
               "ensemble": prompt.ensemble, "query": prompt.query}
    log_line(f"{path}: {summary}; {bundle.name} {cfg.data.eval_split} split, {len(bundle.test)} images, "
             f"on {device}, precision {cfg.precision}")
    out = evaluate(model.to(device), bundle.test, "phase2", device, cfg)
    metrics = accuracy_report(out.preds, out.labels, bundle.class_counts)
    metrics.update(match_stats(out.labels, out.topk_idx, bundle.num_classes, prompt.pool_size))
    per_class = per_class_table(out.preds, out.labels, bundle.class_counts, bundle.class_names)
    return OfficialEvaluation(bundle.name, len(bundle.test), summary, metrics, _group_counts(per_class), per_class)


def _group_counts(per_class: pa.Table) -> dict[str, tuple[int, int]]:
    """(correct, images) overall and per shot group under both rules, keyed like accuracy_report."""
    rows = per_class.to_pylist()
    counts = {"acc": (sum(r["correct"] for r in rows), sum(r["test_count"] for r in rows))}
    for column, suffix in (("shot_authors", ""), ("shot_standard", "_std")):
        for group in ("many", "medium", "few"):
            members = [r for r in rows if r[column] == group]
            counts[group + suffix] = (sum(r["correct"] for r in members), sum(r["test_count"] for r in members))
    return counts


SPLIT_RULE_LABELS = (("", "authors' rule, few n <= 20"), ("_std", "standard rule, few n < 20"))


def format_evaluation(result: OfficialEvaluation) -> str:
    """The paper's table: overall / many / medium / few, each as percent (correct/images), under both rules."""
    lines = []
    for suffix, label in SPLIT_RULE_LABELS:
        keys = {"overall": "acc", "many": "many" + suffix, "medium": "medium" + suffix, "few": "few" + suffix}
        cells = [f"{name} {result.metrics[key]:.2f} ({result.counts[key][0]}/{result.counts[key][1]})"
                 for name, key in keys.items()]
        lines.append(f"{label:<26} " + " | ".join(cells))
    return "\n".join(lines)
