"""Names and params of the MLflow runs: readable, accepted by MLflow, and read back under lpt_core's keys."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from mlflow.utils.validation import _validate_metric_name, _validate_param_name

from lpt_core.metrics import accuracy_report, match_stats
from lpt_core.config import LPTConfig
from orchestration.tracking.run_names import lpt_metrics, mlflow_metrics, row_metric_name, row_metrics, stage_params, \
    stage_run_name, trained_params
from orchestration.plan.record import PlanRecord


def _every_stage_metric() -> dict[str, float]:
    """Every key a stage reports: an epoch's training and evaluation, matching and feature statistics."""
    labels, preds = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2])
    report = accuracy_report(preds, labels, torch.tensor([150, 50, 10]))
    matching = match_stats(labels, torch.tensor([[0, 1], [0, 1], [1, 2], [2, 0]]), 3, 4)
    return {"epoch": 2, "loss": 1.5, "lr": 0.01, "epoch_time_s": 3.0, "train_images_per_s": 90.0, **report,
            **matching, "query_knn_acc": 40.0, "query_gamma": 0.5}


def test_metric_names_group_by_split_rule_and_name_fractions() -> None:
    names = mlflow_metrics(_every_stage_metric())
    assert {"acc", "mean_class_acc", "loss", "lr", "epoch"} <= set(names)  # short names stay
    assert [n for n in names if n.startswith("authors/")] == ["authors/many", "authors/medium", "authors/few"]
    assert [n for n in names if n.startswith("standard/")] == ["standard/many", "standard/medium", "standard/few"]
    assert sorted(n for n in names if n.startswith("matching/")) == [
        "matching/consistency_frac", "matching/entropy_frac", "matching/pool_usage_frac"]
    assert {"query/knn_acc", "query/gamma", "speed/epoch_s", "speed/train_images_per_s"} <= set(names)
    assert not [n for n in names if n.endswith("_std")]
    for name in names:
        _validate_metric_name(name)


def test_metric_names_read_back_as_lpt_core_keys() -> None:
    metrics = _every_stage_metric()
    assert lpt_metrics(mlflow_metrics(metrics)) == metrics
    assert lpt_metrics({"standard/few": 12.5, "acc/m:20": 50.0}) == {"few_std": 12.5, "acc/m:20": 50.0}


@pytest.mark.parametrize("stage, axis, rows, seed, name", [
    ("phase2", "m", ["20"], 0, "phase2 m=20 seed=0"),
    ("phase1", "m", ["5", "10", "20", "40"], 1, "phase1 (shared by m=5,10,20,40) seed=1"),
    ("phase1", "m", ["5"], 0, "phase1 m=5 seed=0"),
    ("joint", "training", ["joint"], 2, "joint training=joint seed=2"),
    ("phase1", None, [], 0, "phase1 (shared by every trial) seed=0"),
    ("phase2", None, ["lambda_pos_ib=0.5, eta=0.3"], 0, "phase2 lambda_pos_ib=0.5, eta=0.3 seed=0"),
])
def test_stage_run_names(stage: str, axis: str | None, rows: list[str], seed: int, name: str) -> None:
    assert stage_run_name(stage, axis, rows, seed) == name


def test_stage_params_are_the_sections_the_stage_reads() -> None:
    cfg = LPTConfig()
    cfg = dataclasses.replace(cfg, phase2=dataclasses.replace(cfg.phase2, base_lr=0.04, batch_size=64))
    phase1, phase2 = stage_params(cfg, "phase1"), stage_params(cfg, "phase2")
    assert {k.split(".")[0] for k in phase1} == {"backbone", "data", "eval", "seed", "precision", "phase1", "prompt",
                                                 "device", "threads", "derived"}
    assert {k for k in phase1 if k.startswith("prompt.")} == {"prompt.length", "prompt.shared", "prompt.init_std",
                                                               "prompt.head_dropout"}
    assert not [k for k in phase2 if k.startswith(("phase1.", "joint."))]
    assert phase2["prompt.pool_size"] == cfg.prompt.pool_size and phase2["phase2.batch_size"] == 64
    assert phase2["derived.lr"] == 0.04 * 64 / 256 and phase1["derived.lr"] == cfg.phase1.base_lr
    for key in phase2:
        _validate_param_name(key)


def test_trained_params() -> None:
    extras = {"trainable_params": 1234, "backbone": {"name": "vit_tiny", "weights_digest": "ab12", "norm_eps": None},
              "resumed_after_epoch": None}
    assert trained_params(extras) == {"derived.trainable_params": 1234, "derived.backbone.name": "vit_tiny",
                                      "derived.backbone.weights_digest": "ab12", "derived.backbone.norm_eps": None}


def test_row_metric_names() -> None:
    assert row_metric_name("acc", "m", "20") == "acc/m:20"
    assert row_metric_name("few", "query", "phase1") == "authors/few/query:phase1"
    assert row_metric_name("acc", "lambda+/lambda-/eta", "0.5,8.0,0.5") == "acc/lambda__lambda-_eta:0.5 8.0 0.5"
    sampled = row_metric_name("acc", None, "lambda_pos_ib=0.5, lambda_neg_ib=8, eta=0.3")
    assert sampled == "acc/lambda_pos_ib:0.5 lambda_neg_ib:8 eta:0.3"
    for name in (sampled, row_metric_name("acc", "lambda+/lambda-/eta", "0.5,8.0,0.5") + "/lo"):
        _validate_metric_name(name)


def test_row_metrics_carry_the_interval_and_skip_the_shared_phase1() -> None:
    rows = [{"row": "5", "role": "row", "acc": 50.0, "acc_lo": 40.0, "acc_hi": 60.5},
            {"row": "20", "role": "reference", "acc": 55.0},  # no predictions: no interval
            {"row": "40", "role": "row", "acc": math.nan},
            {"row": "phase 1 (shared upstream)", "role": "upstream", "acc": 30.0, "acc_lo": 20.0, "acc_hi": 40.0}]
    assert row_metrics("acc", "m", rows) == {"acc/m:5": 50.0, "acc/m:5/lo": 40.0, "acc/m:5/hi": 60.5,
                                             "acc/m:20": 55.0}


def _plan(**changes) -> PlanRecord:
    plan = PlanRecord("f", "gs", "group_size", "demo", "m", ["5", "20"], [0, 1], "grid", "acc", "/stages",
                      {"search.name": "grid"})
    return dataclasses.replace(plan, **changes)


def test_parent_params() -> None:
    assert _plan().parent_params() == {"ablation": "group_size", "experiment": "demo", "axis": "m", "search": "grid",
                                     "seeds": "0,1", "metric": "acc", "rows": "5,20", "reference": "m=20"}
    assert _plan(rows=["5", "10"]).parent_params()["reference"] == "(not in this sweep)"
    searched = _plan(ablation="loss", axis="lambda+/lambda-/eta", rows=[], search="optuna", content={
        "search.name": "optuna", "search.num_samples": 16, "search.sampler": "tpe", "phase2.epochs": 30})
    assert searched.parent_params() == {"ablation": "loss", "experiment": "demo", "axis": "lambda+/lambda-/eta",
                                      "search": "optuna", "seeds": "0,1", "metric": "acc",
                                      "search.num_samples": 16, "search.sampler": "tpe"}
