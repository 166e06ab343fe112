"""The stage dependencies lpt_core.stages declares are the true ones, field by field of LPTConfig.

A field a stage does not depend on (not in its STAGE_FIELDS, nor in those of the stage it starts from) is changed
to another valid value, and a tiny 1-epoch run of the stage must stay bit-identical: trainable tensors, optimizer
state, history and final metrics (feature statistics included). A declared field must change the stage's key.
PLACEMENT_FIELDS are outside every key by design; the test states what they may change: float rounding only.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import pytest
import torch

from lpt_core.checkpoint import load_checkpoint
from lpt_core.config import LPTConfig, build_dataclass, from_dict, to_dict
from lpt_core.stages import PLACEMENT_FIELDS, STAGE_FIELDS, UPSTREAM, stages_changed_by, touches
from lpt_core.train import StageResult, run_stage
from lpt_core.stages import stage_key

from .conftest import QuietHooks, assert_same, without_timing


def _leaves(cls: type = LPTConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of the LPTConfig dataclass tree: dotted name -> annotation."""
    hints, leaves = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            leaves.update(_leaves(hints[f.name], f"{prefix}{f.name}."))
        else:
            leaves[f"{prefix}{f.name}"] = hints[f.name]
    return leaves


LEAVES = _leaves()


def _closure(stage: str) -> tuple[str, ...]:
    """The fields a stage depends on: its own and, through the checkpoint it starts from, its upstream's."""
    upstream = UPSTREAM[stage]
    return STAGE_FIELDS[stage] + (_closure(upstream) if upstream else ())


def _undeclared(stage: str) -> list[str]:
    return [f for f in LEAVES if not touches(f, _closure(stage)) and f not in PLACEMENT_FIELDS]


def _get(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values[part]
    return values


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        values = values[part]
    values[leaf] = value


def _other(value: Any, annotation: Any) -> Any:
    """Another valid value of a field: the next choice, the other bool, one more, half (or 0.01), one more key."""
    if typing.get_origin(annotation) is Literal:
        return next(choice for choice in typing.get_args(annotation) if choice != value)
    if value is None:  # an optional field left unset: set it
        kind = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        return {int: 1, float: 1e-5, str: "other"}[kind]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float, str, dict)):
        return {int: lambda: value + 1, float: lambda: value / 2 if value else 0.01, str: lambda: f"{value}_other",
                dict: lambda: {**value, "probe": 1}}[type(value)]()
    raise TypeError(f"no other value for {value!r} ({annotation})")


def _changed(cfg: LPTConfig, field: str, value: Any = None, validate: bool = True) -> LPTConfig:
    """`cfg` with `field` set to `value` (default: another valid value), validated unless only keyed."""
    values = to_dict(cfg)
    _set(values, field, _other(_get(values, field), LEAVES[field]) if value is None else value)
    return from_dict(values) if validate else build_dataclass(LPTConfig, values)


@pytest.fixture(scope="module")
def tiny(make_config: Callable[..., LPTConfig]) -> Callable[[str], LPTConfig]:
    """The config of a 1-epoch run of `stage`, evaluated with the feature statistics (K-NN, gamma) so that they
    are compared too; the other stages keep 2 epochs, so that each of their fields has another valid value."""
    return lambda stage: make_config({stage: {"epochs": 1}, "eval": {"feature_stats": True}})


@pytest.fixture(scope="module")
def train_one(phase1_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., StageResult]:
    """Runs a stage in a fresh folder; phase 2 always starts from the same phase-1 checkpoint."""

    def run(cfg: LPTConfig, stage: str) -> StageResult:
        init = phase1_checkpoint if stage == "phase2" else None
        return run_stage(cfg, stage, tmp_path_factory.mktemp(stage), QuietHooks(), init_from=init)

    return run


@pytest.fixture(scope="module")
def baseline(tiny, train_one) -> Callable[[str], StageResult]:
    results: dict[str, StageResult] = {}

    def get(stage: str) -> StageResult:
        if stage not in results:
            results[stage] = train_one(tiny(stage), stage)
        return results[stage]

    return get


def _outcome(result: StageResult) -> dict[str, Any]:
    """What a stage hands on and reports: its checkpoint's tensors and optimizer state, its history and metrics."""
    state, _ = load_checkpoint(result.checkpoint_dir)
    (metrics,) = without_timing([result.metrics])
    return {"model": state["model"], "optimizer": state["optimizer"], "history": without_timing(result.history),
            "metrics": metrics}


@pytest.mark.parametrize("stage, field", [(s, f) for s in STAGE_FIELDS for f in _undeclared(s)])
def test_a_field_outside_the_declaration_leaves_the_stage_bit_identical(tiny, train_one, baseline, stage: str,
                                                                        field: str) -> None:
    changed = _changed(tiny(stage), field)
    assert _get(to_dict(changed), field) != _get(to_dict(tiny(stage)), field)
    assert_same(_outcome(train_one(changed, stage)), _outcome(baseline(stage)), f"{stage} with {field}")


@pytest.mark.parametrize("stage, field", [(s, f) for s in STAGE_FIELDS for f in LEAVES if touches(f, _closure(s))])
def test_a_declared_field_changes_the_key(tiny, stage: str, field: str) -> None:
    def key(cfg: LPTConfig) -> str:
        upstream = UPSTREAM[stage]
        return stage_key(stage, cfg, stage_key(upstream, cfg, None) if upstream else None)

    base = tiny(stage)  # a key is a hash of the values: no run, so another value need not be valid with the rest
    assert key(_changed(base, field, validate=False)) != key(base)


def test_the_proof_covers_every_field() -> None:
    """Each declared name is a field of LPTConfig, and the placement fields are fields too."""
    for stage, fields in STAGE_FIELDS.items():
        for name in fields:
            assert any(touches(leaf, [name]) for leaf in LEAVES), (stage, name)
    assert set(PLACEMENT_FIELDS) <= set(LEAVES)
    # phase 1 is the stage every phase-2 trial shares: the pool, matching, phase 2, joint and the choice of
    # training are exactly what it leaves out
    assert _undeclared("phase1") == [f for f in LEAVES if f.split(".")[0] in ("phase2", "joint", "training")
                                     or f in ("prompt.pool_size", "prompt.top_k", "prompt.block_k", "prompt.ensemble",
                                              "prompt.query", "prompt.reuse_block_k")]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("stage", list(STAGE_FIELDS))
def test_threads_change_at_most_the_rounding(tiny, train_one, baseline, restore_threads, stage: str) -> None:
    """threads is outside every key on purpose (a stage trained on one machine serves trials on another): the
    order of intra-op reductions may move the last bits, nothing more."""
    ours, base = _outcome(train_one(_changed(tiny(stage), "threads", 2), stage)), _outcome(baseline(stage))
    torch.testing.assert_close(ours["model"], base["model"], rtol=1e-4, atol=1e-5)
    for got, want in zip([*ours["history"], ours["metrics"]], [*base["history"], base["metrics"]], strict=True):
        assert got == pytest.approx(want, rel=1e-4, nan_ok=True)


def test_device_auto_is_the_same_run_where_it_resolves_to_the_cpu(tiny, train_one, baseline) -> None:
    if torch.cuda.is_available():
        pytest.skip("device=auto is CUDA here: other kernels, and bf16 under precision=auto (PLACEMENT_FIELDS)")
    assert_same(_outcome(train_one(_changed(tiny("phase1"), "device", "auto"), "phase1")),
                _outcome(baseline("phase1")), "phase1 with device=auto")


@pytest.mark.parametrize("keys, stages", [
    (["prompt.pool_size"], {"phase2", "joint"}),
    (["phase1.epochs"], {"phase1", "phase2"}),  # phase 2 starts from phase 1
    (["phase2.loss.eta", "joint.epochs"], {"phase2", "joint"}),
    (["prompt"], {"phase1", "phase2", "joint"}),  # a key that holds declared fields
    (["backbone.model_kwargs.embed_dim"], {"phase1", "phase2", "joint"}),  # a key inside a declared field
    (["training", "device", "threads"], set()),
])
def test_stages_changed_by(keys: list[str], stages: set[str]) -> None:
    assert stages_changed_by(keys) == stages
