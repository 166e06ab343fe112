"""from_dict is the edge: unknown keys, wrong types and every range check raise ConfigError naming the dotted key."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from lpt_core.config import (
    STAGES,
    ConfigError,
    LossConfig,
    LPTConfig,
    StageConfig,
    flatten,
    from_dict,
    to_dict,
)


def test_defaults_are_valid_and_match_the_recipe() -> None:
    cfg = from_dict({})
    assert cfg == LPTConfig()
    assert cfg.prompt.length == 10 and cfg.prompt.pool_size == 20 and cfg.prompt.top_k == 2
    assert cfg.prompt.block_k is None and cfg.prompt.ensemble == "mean" and cfg.prompt.reuse_block_k
    assert cfg.phase2.optimizer == "sgd" and cfg.phase2.momentum == 0.9 and cfg.phase2.weight_decay == 0.01
    assert cfg.phase2.base_lr == 0.02 and cfg.phase2.batch_size == 256 and cfg.phase2.lr == pytest.approx(0.02)
    assert cfg.phase2.epochs == 90 and cfg.joint.epochs == 80 and cfg.phase2.warmup_epochs == 1
    assert cfg.phase1.loss.lambda_neg_cb == 4.0 and cfg.phase1.loss.lambda_pos_ib == 0.5
    assert cfg.phase1.loss.lambda_neg_ib == 8.0 and cfg.phase1.loss.label_smoothing == 0.1
    assert cfg.data.img_size == 224 and cfg.data.resize_size == 256


def test_round_trip_through_to_dict_and_json() -> None:
    cfg = from_dict({"prompt": {"pool_size": 10, "ensemble": "concat"}, "phase2": {"loss": {"eta": 0.25}}})
    again = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg
    assert again.prompt.ensemble == "concat" and again.phase2.loss.eta == 0.25
    assert again.phase1.loss.eta == 0.5  # nested defaults are per-phase, not shared objects
    assert again.phase1.loss is not again.phase2.loss


def test_lr_scales_with_batch_size() -> None:
    assert StageConfig(base_lr=0.02, batch_size=512).lr == pytest.approx(0.04)
    assert StageConfig(base_lr=0.02, batch_size=64).lr == pytest.approx(0.005)


@pytest.mark.parametrize("values, dotted, suggestion", [
    ({"promt": {}}, "promt", "prompt"),
    ({"prompt": {"pool_sise": 5}}, "prompt.pool_sise", "pool_size"),
    ({"phase2": {"loss": {"lamda_neg_cb": 1.0}}}, "phase2.loss.lamda_neg_cb", "lambda_neg_cb"),
    ({"data": {"img_sizes": 32}}, "data.img_sizes", "img_size"),
])
def test_unknown_key_suggests_closest(values: dict, dotted: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key '{dotted}'; did you mean '{suggestion}'?")):
        from_dict(values)


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"eval": {"zzzzzz": 1}})
    message = str(err.value)
    assert "eval.zzzzzz" in message and "valid keys" in message
    assert all(f.name in message for f in dataclasses.fields(LPTConfig().eval))


@pytest.mark.parametrize("values, dotted", [
    ({"seed": "0"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": True}, "seed"),  # bool is an int subclass but not an int here
    ({"prompt": {"length": 2.0}}, "prompt.length"),
    ({"prompt": {"shared": 1}}, "prompt.shared"),
    ({"prompt": {"init_std": "0.02"}}, "prompt.init_std"),
    ({"prompt": {"init_std": True}}, "prompt.init_std"),
    ({"prompt": {"block_k": "6"}}, "prompt.block_k"),
    ({"prompt": {"ensemble": "sum"}}, "prompt.ensemble"),
    ({"prompt": {"query": "phase2"}}, "prompt.query"),
    ({"phase1": {"sampling": "balanced"}}, "phase1.sampling"),
    ({"phase1": {"optimizer": "adam"}}, "phase1.optimizer"),
    ({"phase2": {"loss": {"name": "focal"}}}, "phase2.loss.name"),
    ({"phase2": {"loss": 3}}, "phase2.loss"),
    ({"backbone": {"model_kwargs": [1, 2]}}, "backbone.model_kwargs"),
    ({"backbone": {"weights_file": 3}}, "backbone.weights_file"),
    ({"data": {"name": None}}, "data.name"),
    ({"training": "mixed"}, "training"),
    ({"precision": "fp16"}, "precision"),
    ({"threads": 1.0}, "threads"),
])
def test_wrong_types_name_the_key(values: dict, dotted: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(dotted)}: "):
        from_dict(values)


def test_int_accepted_for_float() -> None:
    cfg = from_dict({"phase1": {"base_lr": 1, "min_lr": 0, "loss": {"scale": 30}}, "prompt": {"init_std": 1}})
    assert cfg.phase1.base_lr == 1.0 and isinstance(cfg.phase1.base_lr, float)
    assert isinstance(cfg.phase1.min_lr, float) and isinstance(cfg.phase1.loss.scale, float)
    assert isinstance(cfg.prompt.init_std, float)


def test_optional_fields_accept_none_and_values() -> None:
    cfg = from_dict({"prompt": {"block_k": None}, "threads": None, "backbone": {"weights_file": None}})
    assert cfg.prompt.block_k is None and cfg.threads is None
    cfg = from_dict({"prompt": {"block_k": 3}, "threads": 2, "phase1": {"steps_per_epoch": 7}})
    assert cfg.prompt.block_k == 3 and cfg.threads == 2 and cfg.phase1.steps_per_epoch == 7


def test_options_dict_is_passed_through_and_copied() -> None:
    options = {"train_list": "a.txt", "num_classes": 3}
    cfg = from_dict({"data": {"options": options}})
    assert cfg.data.options == options
    options["num_classes"] = 99
    assert cfg.data.options["num_classes"] == 3


# every range check of _validate: (overrides, dotted key in the message)
RANGE_CHECKS = [
    ({"prompt": {"length": 0}}, "prompt.length"),
    ({"prompt": {"pool_size": 0}}, "prompt.pool_size"),
    ({"prompt": {"top_k": 0}}, "prompt.top_k"),
    ({"prompt": {"pool_size": 4, "top_k": 5}}, "prompt.top_k"),
    ({"prompt": {"block_k": -1}}, "prompt.block_k"),
    ({"prompt": {"init_std": 0.0}}, "prompt.init_std"),
    ({"prompt": {"head_dropout": 1.0}}, "prompt.head_dropout"),
    ({"prompt": {"head_dropout": -0.1}}, "prompt.head_dropout"),
    ({"prompt": {"shared": False}, "training": "joint"}, "prompt.shared"),
    ({"data": {"img_size": 4, "resize_size": 4}}, "data.img_size"),
    ({"data": {"img_size": 32, "resize_size": 16}}, "data.resize_size"),
    ({"data": {"crop_min_scale": 0.0}}, "data.crop_min_scale"),
    ({"data": {"crop_min_scale": 1.5}}, "data.crop_min_scale"),
    ({"data": {"num_workers": -1}}, "data.num_workers"),
    ({"data": {"eval_batch_size": 0}}, "data.eval_batch_size"),
    ({"eval": {"every_epochs": 0}}, "eval.every_epochs"),
    ({"eval": {"knn_k": 0}}, "eval.knn_k"),
    ({"device": "tpu"}, "device"),
    ({"threads": 0}, "threads"),
]
PHASE_CHECKS = [
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"images_per_class": 0}, "images_per_class"),
    ({"base_lr": 0.0}, "base_lr"),
    ({"base_lr": -1.0}, "base_lr"),
    ({"weight_decay": -0.01}, "weight_decay"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"epochs": 3, "warmup_epochs": 3}, "warmup_epochs"),
    ({"warmup_epochs": -1}, "warmup_epochs"),
    ({"base_lr": 0.02, "batch_size": 256, "min_lr": 0.02}, "min_lr"),
    ({"min_lr": -0.001}, "min_lr"),
    ({"steps_per_epoch": 0}, "steps_per_epoch"),
    *[({"loss": {attr: -0.5}}, f"loss.{attr}") for attr in (
        "lambda_pos_cb", "lambda_neg_cb", "lambda_pos_ib", "lambda_neg_ib", "noise_sigma", "noise_mul",
        "margin", "eta", "match_weight")],
    ({"loss": {"noise_clip": 0.0}}, "loss.noise_clip"),
    ({"loss": {"scale": 0.0}}, "loss.scale"),
    ({"loss": {"label_smoothing": 1.0}}, "loss.label_smoothing"),
    ({"loss": {"label_smoothing": -0.1}}, "loss.label_smoothing"),
]
ALL_RANGE_CHECKS = RANGE_CHECKS + [
    ({phase: values}, f"{phase}.{key}") for phase in STAGES for values, key in PHASE_CHECKS
]


@pytest.mark.parametrize("values, dotted", ALL_RANGE_CHECKS, ids=[f"{d}:{json.dumps(v)}" for v, d in ALL_RANGE_CHECKS])
def test_range_checks_name_the_dotted_key(values: dict, dotted: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(dotted)}="):
        from_dict(values)


@pytest.mark.parametrize("values", [
    {"prompt": {"pool_size": 4, "top_k": 4}},
    {"prompt": {"block_k": 0}},
    {"prompt": {"head_dropout": 0.0}},
    {"prompt": {"shared": False}},  # linear-probe phase 1, decoupled
    {"prompt": {"shared": False, "query": "pretrained"}, "training": "joint"},
    {"phase1": {"epochs": 1, "warmup_epochs": 0}},
    {"phase1": {"epochs": 3, "warmup_epochs": 2}},
    {"phase1": {"momentum": 0.0, "weight_decay": 0.0, "min_lr": 0.0}},
    {"phase1": {"loss": {"label_smoothing": 0.0, "margin": 0.0, "eta": 0.0}}},
    {"data": {"img_size": 8, "resize_size": 8, "crop_min_scale": 1.0}},
    {"device": "cuda:1"},
    {"device": "cpu"},
])
def test_boundary_values_are_accepted(values: dict) -> None:
    from_dict(values)


def test_validate_catches_direct_construction() -> None:
    cfg = LPTConfig(phase2=StageConfig(loss=LossConfig(scale=-1.0)))
    with pytest.raises(ConfigError, match=r"^phase2\.loss\.scale="):
        cfg.validate()


def test_error_message_says_what_is_valid() -> None:
    with pytest.raises(ConfigError, match=r"prompt\.top_k=7: k must be in \[1, pool_size=5\]"):
        from_dict({"prompt": {"pool_size": 5, "top_k": 7}})
    with pytest.raises(ConfigError, match=r"prompt\.ensemble: 'sum' is not one of \['mean', 'concat'\]"):
        from_dict({"prompt": {"ensemble": "sum"}})


def test_flatten() -> None:
    nested = {"a": {"b": 1, "c": {"d": [1, 2], "e": None}}, "f": "x", "g": {}}
    assert flatten(nested) == {"a.b": 1, "a.c.d": [1, 2], "a.c.e": None, "f": "x", "g": {}}
    assert flatten({"x": 1}, prefix="root") == {"root.x": 1}


def test_flatten_of_a_full_config_has_dotted_leaves() -> None:
    flat = flatten(to_dict(from_dict({"data": {"options": {"k": 1}}})))
    assert flat["phase2.loss.lambda_neg_ib"] == 8.0
    assert flat["prompt.pool_size"] == 20
    assert flat["data.options.k"] == 1
    assert flat["backbone.model_kwargs"] == {}  # an empty mapping is a leaf
    assert not any(isinstance(v, dict) and v for v in flat.values())
