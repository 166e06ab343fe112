"""What the MLflow runs of a sweep are called and what they hold, so that the runs table reads without a legend.

- Metric names: lpt_core's keys renamed for the UI (`few_std` read as a standard deviation). Accuracies are in
  percent: the overall one keeps its short name (`acc`), the shot groups sit under the split rule that defines
  them (`authors/few`, `standard/few`); values in [0, 1] end in `_frac` (`matching/pool_usage_frac`). MLflow's
  charts make a section of each prefix before `/`. The report reads the runs back under lpt_core's keys
  (`lpt_metrics`).
- Stage runs: named for what they are (`phase2 m=20 seed=0`); a stage several rows share says so
  (`phase1 (shared by m=5,10,20,40) seed=0`). Their params are the config sections their stage reads
  (lpt_core.stages.STAGE_FIELDS) and where it ran (PLACEMENT_FIELDS), plus values derived from them.
- The sweep's parent run: one metric per report row with its 95 % interval (its params: PlanRecord.parent_params).
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

from lpt_core.config import LPTConfig, flatten, to_dict
from lpt_core.stages import PLACEMENT_FIELDS, stage_inputs

METRIC_NAMES = {
    "many": "authors/many", "medium": "authors/medium", "few": "authors/few",  # many > 100, few <= 20
    "many_std": "standard/many", "medium_std": "standard/medium", "few_std": "standard/few",  # few < 20
    "match_consistency": "matching/consistency_frac", "pool_usage": "matching/pool_usage_frac",
    "match_entropy": "matching/entropy_frac",  # H(prompt histogram of a class) / log m
    "query_knn_acc": "query/knn_acc", "query_gamma": "query/gamma",
    "epoch_time_s": "speed/epoch_s", "train_images_per_s": "speed/train_images_per_s",
}  # every other key (acc, mean_class_acc, loss, lr, epoch) keeps its name
_LPT_KEYS = {name: key for key, name in METRIC_NAMES.items()}
_SEPARATOR = re.compile(r",\s*")
_NOT_IN_NAMES = re.compile(r"[^\w.\- :]")  # MLflow's metric names: alphanumerics, _ - . space : and / (levels)


def metric_name(key: str) -> str:
    return METRIC_NAMES.get(key, key)


def mlflow_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """lpt_core's metric keys -> the names the runs hold."""
    return {metric_name(key): value for key, value in metrics.items()}


def lpt_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The names the runs hold -> lpt_core's metric keys (what the report and trials.json use)."""
    return {_LPT_KEYS.get(name, name): value for name, value in metrics.items()}


def stage_run_name(stage: str, axis: str | None, rows: Sequence[str], seed: int) -> str:
    """`phase2 m=20 seed=0`, `phase1 (shared by m=5,10,20,40) seed=0`.

    rows: the labels of the rows whose trials run this stage, [] for every trial of a search; axis: the
    ablation's axis, None where the labels name their values themselves (a search's sampled trials)."""
    if not rows:
        return f"{stage} (shared by every trial) seed={seed}"
    values = ",".join(rows) if axis is None else f"{axis}={','.join(rows)}"
    return f"{stage} {values} seed={seed}" if len(rows) == 1 else f"{stage} (shared by {values}) seed={seed}"


def stage_params(cfg: LPTConfig, stage: str) -> dict[str, Any]:
    """The run's params: the config sections `stage` reads, dotted (`phase2.batch_size`, `prompt.pool_size`),
    where it ran, and the effective learning rate (`derived.lr` = base_lr x batch_size / 256)."""
    placement = {field: to_dict(cfg)[field] for field in PLACEMENT_FIELDS}
    return {**flatten(stage_inputs(cfg, stage)), **placement, "derived.lr": cfg.stage_config(stage).lr}


def trained_params(extras: dict[str, Any]) -> dict[str, Any]:
    """What only training knows, logged when the stage ends: the number of trained parameters and the identity
    of the frozen backbone (timm name, sha256 of its weights, LayerNorm eps)."""
    identity = {f"derived.backbone.{key}": value for key, value in extras["backbone"].items()}
    return {"derived.trainable_params": extras["trainable_params"], **identity}


def _name_part(text: str) -> str:
    """A row label or axis as part of a metric name: `=` becomes `:`, a list separator a space, any other
    character MLflow refuses (`/`, `+`, `,`) an underscore."""
    return _NOT_IN_NAMES.sub("_", _SEPARATOR.sub(" ", text.replace("=", ":"))).strip()


def row_metric_name(metric: str, axis: str | None, row: str) -> str:
    """`acc/m:20`: the sweep's metric for one row; axis None for a search's trials (`acc/eta:0.3 ...`)."""
    label = _name_part(row) if axis is None else f"{_name_part(axis)}:{_name_part(row)}"
    return f"{metric_name(metric)}/{label}"


def row_metrics(metric: str, axis: str | None, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """One metric per report row (report.csv's rows; the shared phase 1 has a run of its own) and the ends of
    its 95 % interval: `acc/m:20`, `acc/m:20/lo`, `acc/m:20/hi`. Values the report does not have are left out."""
    found = {}
    for row in rows:
        if row["role"] in ("upstream", "step"):
            continue
        name = row_metric_name(metric, axis, row["row"])
        for suffix, column in (("", metric), ("/lo", f"{metric}_lo"), ("/hi", f"{metric}_hi")):
            value = row.get(column)
            if isinstance(value, (int, float)) and math.isfinite(value):
                found[name + suffix] = float(value)
    return found
