"""The numbers of a report: per table line, point estimates (MLflow's), 95 % intervals and paired differences to
the reference row (lpt_core.uncertainty on the stored per-image predictions), Holm-corrected across the table."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from experiments.ablations import Ablation
from lpt_core.uncertainty import (REPLICATES, Interval, bootstrap_accuracies, bootstrap_p_value, holm,
                                  percentile_interval)
from lpt_core.metrics import image_groups
from orchestration.reporting.sources import Run
from orchestration.plan.record import PlanRecord

RULE_KEYS = ("acc", "many", "medium", "few", "many_std", "medium_std", "few_std")
KNN_KEY = "query_knn_acc"  # accuracy of the K-NN prediction from the query feature (Tab. 2 / 10)
POINT_KEYS = (*RULE_KEYS, KNN_KEY, "match_consistency")  # match_consistency is a share, not an accuracy
KEY_NAMES = {"acc": "overall", "few": "few (authors)", "few_std": "few (standard)", KNN_KEY: "query K-NN"}
ALPHA = 0.05
MAX_OPTUNA_ROWS = 10  # report.md and axis.png show the best trials; report.csv has them all
BOOTSTRAP_SEED = 0  # fixed: the same sweep gives the same report


@dataclass
class Comparison:
    """Line minus reference on one accuracy, paired over images and seeds."""

    interval: Interval
    p: float
    p_holm: float = math.nan

    @property
    def significant(self) -> bool:
        return self.p_holm < ALPHA


@dataclass
class Line:
    """One line of a report table: a grid row or Optuna trial over its seeds, or the shared phase 1 under them."""

    label: str
    stage: str
    runs: list[Run]
    role: str = "row"  # row | reference | upstream
    point: dict[str, float] = field(default_factory=dict)
    interval: dict[str, Interval] = field(default_factory=dict)
    delta: dict[str, Comparison] = field(default_factory=dict)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(sorted(r.seed for r in self.runs))


@dataclass
class Tables:
    """Everything a report's tables and plots show."""

    plan: PlanRecord
    ablation: Ablation
    lines: list[Line]  # in table order; the shared phase 1 (if any) last
    reference: Line | None
    row_upstreams: dict[str, Line]  # a row's own phase 1 where rows do not share one (plots only)
    notes: list[str]
    steps: list[Line] = field(default_factory=list)  # the ablation's steps (row - baseline), role 'step'


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def set_points(lines: list[Line]) -> None:
    """Point estimate of every key: the mean over the line's runs of the value the store holds."""
    for line in lines:
        line.point = {key: _mean([r.metrics.get(key, math.nan) for r in line.runs]) for key in POINT_KEYS}


@dataclass
class _Eval:
    """One run's predictions as arrays: labels [N], pred right [N], K-NN right [N] (or None), group masks."""

    labels: np.ndarray
    right: np.ndarray
    knn: np.ndarray | None
    groups: dict[str, np.ndarray]


def _parse(table: pa.Table) -> _Eval:
    labels = table.column("label").to_numpy().astype(np.int64)
    right = table.column("pred").to_numpy() == labels
    knn = table.column("knn_pred").to_numpy() == labels if "knn_pred" in table.column_names else None
    counts = np.zeros(labels.max() + 1, dtype=np.int64)
    counts[labels] = table.column("train_count").to_numpy()
    groups = {k: v.numpy() for k, v in image_groups(torch.from_numpy(labels), torch.from_numpy(counts)).items()}
    return _Eval(labels, right, knn, groups)


def _bootstrap(lines: list[Line], evals: dict[str, _Eval], replicates: int) -> dict[str, np.ndarray]:
    """Joint replicates [B, lines] of every key, for lines on the same images and seeds (runs paired by seed)."""
    parts = [[evals[r.stage_key] for r in sorted(line.runs, key=lambda r: r.seed)] for line in lines]
    first = parts[0][0]
    right = np.array([[e.right for e in line] for line in parts])  # [R, S, N]
    reps = bootstrap_accuracies(right, first.labels, first.groups, replicates, BOOTSTRAP_SEED)
    if all(e.knn is not None for line in parts for e in line):
        knn = np.array([[e.knn for e in line] for line in parts])
        reps[KNN_KEY] = bootstrap_accuracies(knn, first.labels, {KNN_KEY: first.groups["acc"]}, replicates,
                                               BOOTSTRAP_SEED)[KNN_KEY]
    return reps


def set_intervals(lines: list[Line], tables: dict[str, pa.Table], reference: Line | None, compare: tuple[str, ...],
                  replicates: int = REPLICATES,
                  steps: tuple[tuple[str, str], ...] = ()) -> tuple[list[str], list[Line]]:
    """Intervals for every line whose runs all have predictions (tables: stage key -> predictions); paired
    differences to `reference` for the lines on its images and seeds, and for each step (row, baseline) of the
    ablation, Holm-adjusted together over the table. Returns (notes on what could not be computed, one line per
    step compared: label 'row - baseline', role 'step', its differences in `delta`)."""
    notes: list[str] = []
    step_lines: list[Line] = []
    evals = {key: _parse(table) for key, table in tables.items()}
    ready = [line for line in lines if line.runs and all(r.stage_key in evals for r in line.runs)]
    if len(ready) < len(lines):
        missing = [line.label for line in lines if line not in ready]
        notes.append(f"no per-image predictions for {', '.join(missing)}: point estimates only, no interval")
    by_design: dict[tuple, list[Line]] = {}
    for line in ready:
        labels = evals[line.runs[0].stage_key].labels
        by_design.setdefault((line.seeds, labels.tobytes()), []).append(line)
    for group in by_design.values():
        reps = _bootstrap(group, evals, replicates)
        for i, line in enumerate(group):
            line.interval = {k: percentile_interval(v[:, i], line.point.get(k, math.nan)) for k, v in reps.items()}
            observed = _mean([100.0 * float(evals[r.stage_key].right.mean()) for r in line.runs])
            if abs(observed - line.point["acc"]) > 1e-6:
                notes.append(f"{line.label}: the predictions give overall {observed:.4f} where the store holds "
                             f"{line.point['acc']:.4f}; intervals are from the predictions")
        if reference is not None and reference in group:
            _compare(group, reps, reference, compare)
        step_lines += _steps(group, reps, steps, compare)
    if reference is not None and reference not in ready:
        notes.append(f"the reference row {reference.label} has no predictions: no paired comparison")
    elif reference is not None:
        apart = [line.label for line in ready if line is not reference and not line.delta]
        if apart:
            notes.append(f"{', '.join(apart)}: other seeds or test images than the reference row, not compared")
    ready_labels = {line.label for line in ready}
    done = {line.label for line in step_lines}
    unpaired = [f"{a} - {b}" for a, b in steps if {a, b} <= ready_labels and f"{a} - {b}" not in done]
    if unpaired:
        notes.append(f"{', '.join(unpaired)}: the two rows have other seeds or test images, not compared")
    _holm(lines + step_lines)
    return notes, step_lines


def _differences(group: list[Line], reps: dict[str, np.ndarray], i: int, j: int,
                 compare: tuple[str, ...]) -> dict[str, Comparison]:
    """group[i] minus group[j] on each key of `compare`, paired over the same resampled images and seeds."""
    found = {}
    for key in compare:
        estimate = group[i].point.get(key, math.nan) - group[j].point.get(key, math.nan)
        if key not in reps or math.isnan(estimate):
            continue  # e.g. a shot group without classes
        diffs = reps[key][:, i] - reps[key][:, j]
        found[key] = Comparison(percentile_interval(diffs, estimate), bootstrap_p_value(diffs))
    return found


def _compare(group: list[Line], reps: dict[str, np.ndarray], reference: Line, compare: tuple[str, ...]) -> None:
    ref = group.index(reference)
    for i, line in enumerate(group):
        if line is not reference:
            line.delta = _differences(group, reps, i, ref, compare)


def _steps(group: list[Line], reps: dict[str, np.ndarray], steps: tuple[tuple[str, str], ...],
           compare: tuple[str, ...]) -> list[Line]:
    """The paired differences row - baseline of the steps whose two rows are both in `group`."""
    index = {line.label: i for i, line in enumerate(group)}
    return [Line(f"{row} - {baseline}", "", [], role="step",
                 delta=_differences(group, reps, index[row], index[baseline], compare))
            for row, baseline in steps if row in index and baseline in index]


def _holm(lines: list[Line]) -> None:
    tests = [c for line in lines for c in line.delta.values()]
    for comparison, adjusted in zip(tests, holm([c.p for c in tests])):
        comparison.p_holm = adjusted


def comparison_count(lines: list[Line]) -> int:
    return sum(1 for line in lines for c in line.delta.values() if not math.isnan(c.p))


def paired_comparison(a: Line, b: Line, key: str, tables: dict[str, pa.Table],
                      replicates: int = REPLICATES) -> Comparison | None:
    """a minus b on `key`, paired over the same resampled images and seeds, with the replicates a report's table
    draws (a line's replicates do not depend on the other lines of its table, so this equals the table's own
    difference); None where a line lacks predictions or the two are not on the same seeds and test images."""
    runs = a.runs + b.runs
    if not a.runs or not b.runs or a.seeds != b.seeds or any(r.stage_key not in tables for r in runs):
        return None
    evals = {r.stage_key: _parse(tables[r.stage_key]) for r in runs}
    if evals[a.runs[0].stage_key].labels.tobytes() != evals[b.runs[0].stage_key].labels.tobytes():
        return None
    return _differences([a, b], _bootstrap([a, b], evals, replicates), 0, 1, (key,)).get(key)
