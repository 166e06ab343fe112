"""The one typed configuration that flows from the command line to the trainer.

Every knob of lpt-method.md lives here with the authors' code default. `from_dict` is the edge: it refuses
unknown keys (suggesting the closest), wrong types and invalid combinations with a message that names the dotted
key, so nothing deeper in the code has to re-check its inputs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from lpt_core.suggest import did_you_mean

Stage = Literal["phase1", "phase2", "joint"]
STAGES: tuple[str, ...] = ("phase1", "phase2", "joint")
# free-form mappings whose keys belong to a dataset or a timm model, not to this schema: any key may be set there
OPEN_MAPPINGS = ("data.options", "backbone.model_kwargs")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the dotted key."""


@dataclass
class BackboneConfig:
    # timm model name; the tag selects the weights, e.g. vit_base_patch16_224.augreg_in21k
    name: str = "vit_base_patch16_224.augreg_in21k"
    pretrained: bool = True
    # local weights (.safetensors / .pth / .npz) loaded by timm instead of the hub
    weights_file: str | None = None
    # architecture overrides passed to timm.create_model (the demo's micro ViT uses these)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # eps of every LayerNorm of the ViT (block norms, final norm); None = timm's default (1e-6 for its ViTs). The
    # authors' model passes torch's nn.LayerNorm to timm, so their function (and released checkpoint) uses 1e-5.
    norm_eps: float | None = None


@dataclass
class PromptConfig:
    length: int = 10  # P, tokens per block for the shared prompt and for each group prompt
    shared: bool = True  # False = no shared prompt (linear probe row of Tab. 8)
    pool_size: int = 20  # m
    top_k: int = 2  # k
    block_k: int | None = None  # K: group prompts enter blocks K+1..L; None = L // 2 (6 for ViT-B)
    ensemble: Literal["mean", "concat"] = "mean"
    query: Literal["phase1", "pretrained"] = "phase1"
    reuse_block_k: bool = True  # phase 2 reuses the query pass's block-K tokens instead of recomputing
    init_std: float = 0.02
    head_dropout: float = 0.1


@dataclass
class LossConfig:
    name: Literal["agcl", "ce"] = "agcl"
    # focusing exponents per branch: class-balanced (cb) and instance-balanced (ib) batches
    lambda_pos_cb: float = 0.0
    lambda_neg_cb: float = 4.0
    lambda_pos_ib: float = 0.5
    lambda_neg_ib: float = 8.0
    noise_sigma: float = 1.0 / 3.0
    noise_clip: float = 1.0
    noise_mul: float = 0.5
    margin: float = 0.1
    scale: float = 20.0
    label_smoothing: float = 0.1
    eta: float = 0.5  # beta_e = eta * (E - e) / E weights the instance-balanced branch
    match_weight: float = 1.0  # weight of 1 - mean top-k cos(q, k_i)


@dataclass
class StageConfig:
    epochs: int = 90
    batch_size: int = 256  # per branch: one class-balanced and one instance-balanced batch per step
    sampling: Literal["dual", "class_balanced", "instance"] = "dual"
    images_per_class: int = 4
    optimizer: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = 0.02  # lr = base_lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    min_lr: float = 0.0
    steps_per_epoch: int | None = None  # None = floor(N / B) + 1, as in the authors' code
    loss: LossConfig = field(default_factory=LossConfig)

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256


@dataclass
class DataConfig:
    name: str = "demo"  # key of lpt_core.data.DATASETS
    root: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific, validated by the dataset
    img_size: int = 224
    resize_size: int = 256
    crop_min_scale: float = 0.08  # RandomResizedCrop scale lower bound (torchvision's default for ImageNet)
    num_workers: int = 0
    eval_batch_size: int = 256
    eval_split: Literal["test", "val"] = "test"
    download: bool = False
    skip_bad_images: bool = False
    cache_dir: str = "outputs/cache"


@dataclass
class EvalConfig:
    every_epochs: int = 1  # evaluate on the eval split every n epochs (and always after the last)
    knn_k: int = 10
    feature_stats: bool = True  # K-NN accuracy and gamma of the query features at the end of a stage


@dataclass
class LPTConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    phase1: StageConfig = field(default_factory=StageConfig)
    phase2: StageConfig = field(default_factory=StageConfig)
    joint: StageConfig = field(default_factory=lambda: StageConfig(epochs=80))
    eval: EvalConfig = field(default_factory=EvalConfig)
    training: Literal["decoupled", "joint"] = "decoupled"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    threads: int | None = None  # torch intra-op threads; None leaves torch's default

    def stage_config(self, stage: str) -> StageConfig:
        return getattr(self, stage)

    def validate(self) -> LPTConfig:
        _validate(self)
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> LPTConfig:
        """A validated copy with dotted keys set (an ablation row, Optuna's sampled values, the seed): how a sweep
        derives each trial's config from the one the command line built. A key that does not exist is refused,
        naming the closest one."""
        cfg = self
        for dotted, value in overrides.items():
            cfg = _replaced(cfg, dotted.split("."), value, dotted)
        return cfg.validate()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int or tp is bool:
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from nested dicts, refusing unknown keys and wrong types (named by dotted key)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'; {did_you_mean(key, names)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def no_such_key(dotted: str, depth: int, valid: list[str] | None) -> ConfigError:
    """The error of an override whose key does not exist below its first `depth` parts: the closest valid key at
    that level, or (valid None) that the level holds a value, not keys. Both the command line's key check and
    `with_overrides` raise it, so a typo reads the same wherever it is caught."""
    parts = dotted.split(".")
    path, wrong = ".".join(parts[:depth]), ".".join(parts[:depth + 1])
    if valid is None:
        return ConfigError(f"override '{dotted}': no config key '{wrong}'; '{path}' holds a value, not keys")
    hint = did_you_mean(parts[depth], valid, prefix=f"{path}." if path else "",
                        what=f"keys under {path}" if path else "keys")
    return ConfigError(f"override '{dotted}': no config key '{wrong}'; {hint}")


def _replaced(node: Any, parts: list[str], value: Any, dotted: str, depth: int = 0) -> Any:
    """`node` (a config dataclass, or an open mapping) with the key parts[depth:] set to `value`, typed."""
    part, last = parts[depth], depth == len(parts) - 1
    if isinstance(node, dict) and (part in node or ".".join(parts[:depth]) in OPEN_MAPPINGS):
        return {**node, part: copy.deepcopy(value) if last else _replaced(node.get(part, {}), parts, value, dotted,
                                                                          depth + 1)}
    if not dataclasses.is_dataclass(node):
        raise no_such_key(dotted, depth, None)
    names = [f.name for f in dataclasses.fields(node)]
    if part not in names:
        raise no_such_key(dotted, depth, names)
    if last:
        new = _coerce(value, typing.get_type_hints(type(node))[part], dotted)
    else:
        new = _replaced(getattr(node, part), parts, value, dotted, depth + 1)
    return dataclasses.replace(node, **{part: new})


def from_dict(values: dict[str, Any]) -> LPTConfig:
    """Builds and validates an LPTConfig from plain (e.g. Hydra-resolved) nested dicts."""
    return build_dataclass(LPTConfig, values).validate()


def to_dict(cfg: LPTConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form trackers and search spaces use."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def _check(condition: bool, key: str, value: Any, expectation: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r}: {expectation}")


def _validate_stage(name: str, stage: StageConfig) -> None:
    _check(stage.epochs >= 1, f"{name}.epochs", stage.epochs, "must be >= 1")
    _check(stage.batch_size >= 1, f"{name}.batch_size", stage.batch_size, "must be >= 1")
    _check(stage.images_per_class >= 1, f"{name}.images_per_class", stage.images_per_class, "must be >= 1")
    _check(stage.base_lr > 0, f"{name}.base_lr", stage.base_lr, "must be > 0")
    _check(stage.weight_decay >= 0, f"{name}.weight_decay", stage.weight_decay, "must be >= 0")
    _check(0 <= stage.momentum < 1, f"{name}.momentum", stage.momentum, "must be in [0, 1)")
    _check(0 <= stage.warmup_epochs < stage.epochs or stage.warmup_epochs == 0, f"{name}.warmup_epochs",
           stage.warmup_epochs, f"must be in [0, epochs={stage.epochs})")
    _check(0 <= stage.min_lr < stage.lr, f"{name}.min_lr", stage.min_lr, f"must be in [0, lr={stage.lr})")
    if stage.steps_per_epoch is not None:
        _check(stage.steps_per_epoch >= 1, f"{name}.steps_per_epoch", stage.steps_per_epoch, "must be >= 1")
    loss = stage.loss
    for attr in ("lambda_pos_cb", "lambda_neg_cb", "lambda_pos_ib", "lambda_neg_ib", "noise_sigma", "noise_mul",
                 "margin", "eta", "match_weight"):
        _check(getattr(loss, attr) >= 0, f"{name}.loss.{attr}", getattr(loss, attr), "must be >= 0")
    _check(loss.noise_clip > 0, f"{name}.loss.noise_clip", loss.noise_clip, "must be > 0")
    _check(loss.scale > 0, f"{name}.loss.scale", loss.scale, "must be > 0")
    _check(0 <= loss.label_smoothing < 1, f"{name}.loss.label_smoothing", loss.label_smoothing, "must be in [0, 1)")


def _validate(cfg: LPTConfig) -> None:
    eps = cfg.backbone.norm_eps
    if eps is not None:
        _check(math.isfinite(eps) and eps > 0, "backbone.norm_eps", eps, "must be a finite number > 0 (or null)")
    p = cfg.prompt
    _check(p.length >= 1, "prompt.length", p.length, "P must be >= 1")
    _check(p.pool_size >= 1, "prompt.pool_size", p.pool_size, "m must be >= 1")
    _check(1 <= p.top_k <= p.pool_size, "prompt.top_k", p.top_k, f"k must be in [1, pool_size={p.pool_size}]")
    if p.block_k is not None:
        _check(p.block_k >= 0, "prompt.block_k", p.block_k, "K must be >= 0")
    _check(p.init_std > 0, "prompt.init_std", p.init_std, "must be > 0")
    _check(0 <= p.head_dropout < 1, "prompt.head_dropout", p.head_dropout, "must be in [0, 1)")
    if not p.shared:
        _check(p.query == "pretrained" or cfg.training == "decoupled", "prompt.shared", p.shared,
               "joint training needs the shared prompt")
    for name in STAGES:
        _validate_stage(name, cfg.stage_config(name))
    d = cfg.data
    _check(d.img_size >= 8, "data.img_size", d.img_size, "must be >= 8")
    _check(d.resize_size >= d.img_size, "data.resize_size", d.resize_size, f"must be >= data.img_size={d.img_size}")
    _check(0 < d.crop_min_scale <= 1, "data.crop_min_scale", d.crop_min_scale, "must be in (0, 1]")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be >= 1")
    _check(cfg.eval.every_epochs >= 1, "eval.every_epochs", cfg.eval.every_epochs, "must be >= 1")
    _check(cfg.eval.knn_k >= 1, "eval.knn_k", cfg.eval.knn_k, "must be >= 1")
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device", cfg.device,
           "must be auto, cpu, cuda or cuda:N")
    if cfg.threads is not None:
        _check(cfg.threads >= 1, "threads", cfg.threads, "must be >= 1")
