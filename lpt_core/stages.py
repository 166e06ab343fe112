"""What each stage of LPT depends on: the config fields that decide its result, declared by the method.

Phase 1 trains the shared prompt u and the classifier; phase 2 starts from them and trains the group pool;
joint trains all three at once (lpt_core.model.TRAINABLE). A stage's result is a function of exactly its
STAGE_FIELDS and, for phase 2, of the phase 1 it starts from (UPSTREAM). The stage store keys a stage by these
fields plus its upstream's key, and a checkpoint records them (`stage_inputs`), so a phase 1 shared by trials that
differ elsewhere is the same whichever trial trained it. tests/lpt_core/test_stage_fields.py proves the
declaration: changing any field a stage does not declare (directly or through its upstream) leaves that stage
bit-identical, and changing any declared field changes its key.

Why each field is there:
- backbone: the frozen ViT (architecture, weights, LayerNorm eps). `pretrained` is moot once `weights_file` is
  set, but `backbone` is keyed whole.
- data: the images, their split, transforms and augmentation. num_workers changes which random stream each
  worker's augmentation draws from, eval_batch_size the float rounding of the evaluation (and so its metrics).
  cache_dir (where manifests are cached) and download (fetch what is missing) change no result; `data` is keyed
  whole, and keying its parts would change every existing stage key for the rare sweep that moves the cache.
- eval: every stage's result holds its evaluation: every_epochs decides which epochs of the history carry
  accuracies, knn_k and feature_stats the feature statistics of the final metrics.
- seed: every random draw (initialisation, samplers, augmentation, noise of A-GCL, dropout).
- precision: bf16 autocast or fp32 in every forward.
- phase1 / phase2 / joint: the stage's own recipe (epochs, batches, sampling, optimizer, schedule, loss); each
  stage reads only its own section.
- prompt.length, prompt.shared, prompt.init_std, prompt.head_dropout (phase 1): the shared prompt's shape and
  initialisation and the dropout before the classifier. The pool settings (pool_size, top_k, block_k, ensemble,
  query, reuse_block_k) do not touch phase 1: the pool is created after the shared prompt and the classifier,
  so its size does not move the random stream phase 1 draws from, and the phase-1 forward never reads it.
- prompt (phase 2, joint): all of it; the pool and its matching are what these stages train and run.

Not in any stage's key:
- training: it picks the stages (phase 1 + phase 2, or joint), not how one of them computes.
- PLACEMENT_FIELDS (device, threads): where and how fast a stage runs. They change float rounding only: threads
  the order of intra-op reductions (phase 1's loss differs in its last bits between 1 and 2 threads on CPU),
  device the kernels, and with precision=auto also bf16 on CUDA against fp32 on CPU. Keying them would keep a
  phase 1 trained on one machine from serving trials on another, the point of the store; the device a stage ran
  on is recorded with its run (MLflow tag lpt.device).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from lpt_core.config import LPTConfig, to_dict
from lpt_core.files import content_key

STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "phase1": ("backbone", "data", "eval", "seed", "precision", "phase1", "prompt.length", "prompt.shared",
               "prompt.init_std", "prompt.head_dropout"),
    "phase2": ("backbone", "data", "eval", "seed", "precision", "phase2", "prompt"),
    "joint": ("backbone", "data", "eval", "seed", "precision", "joint", "prompt"),
}
UPSTREAM: dict[str, str | None] = {"phase1": None, "phase2": "phase1", "joint": None}  # the stage one starts from
PLACEMENT_FIELDS = ("device", "threads")


def touches(key: str, fields: Iterable[str]) -> bool:
    """Whether setting dotted `key` changes one of `fields`: it is one, lies inside one, or holds one."""
    return any(key == f or key.startswith(f"{f}.") or f.startswith(f"{key}.") for f in fields)


def stages_changed_by(keys: Iterable[str]) -> set[str]:
    """The stages whose result depends on any of `keys`: directly, or through the stage they start from."""
    keys = list(keys)
    direct = {stage for stage, fields in STAGE_FIELDS.items() if any(touches(key, fields) for key in keys)}
    return {stage for stage in STAGE_FIELDS if stage in direct or UPSTREAM[stage] in direct}


def stage_inputs(cfg: LPTConfig, stage: str) -> dict[str, Any]:
    """The config a checkpoint of `stage` records: the STAGE_FIELDS of that stage, nested as in LPTConfig."""
    full, picked = to_dict(cfg), {}
    for dotted in STAGE_FIELDS[stage]:
        *parents, leaf = dotted.split(".")
        source, target = full, picked
        for part in parents:
            source, target = source[part], target.setdefault(part, {})
        target[leaf] = source[leaf]
    return picked


KEY_LENGTH = 16


def _get(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values[part]
    return values


def stage_key(stage: str, cfg: LPTConfig, upstream: str | None, salt: str = "") -> str:
    """Hash of the stage name, its config fields, its upstream key and an optional salt (cache off)."""
    values = to_dict(cfg)
    content = {"stage": stage, "upstream": upstream, "salt": salt,
               "fields": {name: _get(values, name) for name in STAGE_FIELDS[stage]}}
    return f"{stage}-{content_key(content, KEY_LENGTH)}"


@dataclass(frozen=True)
class StageSpec:
    stage: str  # phase1 | phase2 | joint
    key: str
    upstream: str | None


def stage_chain(cfg: LPTConfig, run_until: str | None = None, salt: str = "") -> tuple[StageSpec, ...]:
    """The stages one trial runs, in order; `run_until='phase1'` stops a decoupled trial after phase 1."""
    if cfg.training == "joint":
        return (StageSpec("joint", stage_key("joint", cfg, None, salt), None),)
    phase1 = StageSpec("phase1", stage_key("phase1", cfg, None, salt), None)
    if run_until == "phase1":
        return (phase1,)
    return phase1, StageSpec("phase2", stage_key("phase2", cfg, phase1.key, salt), phase1.key)


# What phase-2 rows must share to train fused (lpt_core.fused): the phase 1 they start from (its key holds the
# backbone, the data and its transforms, eval, seed, precision and the shared prompt's settings), and every field
# that decides the batches they draw and the random draws between two batches: the epochs and steps, the batch size
# and the sampling branches, the class-balanced sampler's images per class, and the loss's name (A-GCL draws
# noise, CE does not, so the augmentation of the next batch would differ). Where they run is shared by being one
# process. Everything else of phase2 and prompt (the pool, top-k, K, ensemble, query function, the optimizer, LR
# and schedule, the loss's knobs) is each row's own.
FUSION_FIELDS = ("phase2.epochs", "phase2.steps_per_epoch", "phase2.batch_size", "phase2.sampling",
                 "phase2.images_per_class", "phase2.loss.name", *PLACEMENT_FIELDS)


def fusion_key(cfg: LPTConfig, salt: str = "") -> str:
    """Equal for phase-2 rows that may train fused: same upstream phase 1 and same FUSION_FIELDS."""
    values = to_dict(cfg)
    content = {"upstream": stage_key("phase1", cfg, None, salt),
               "fields": {name: _get(values, name) for name in FUSION_FIELDS}}
    return content_key(content, KEY_LENGTH)
