"""How sure an accuracy is: bootstrap intervals over test images (and seeds), paired differences, Holm's correction.

An ablation table compares rows that differ by a point or two on a test set whose own sampling noise is of the same
size; these functions say which differences the data support. Everything works on per-image correctness, so one
set of predictions serves every shot group and every split rule.

The resampling follows how the numbers arise:
- test images are resampled *within their class*, so a class-balanced test set stays balanced and every shot group
  keeps its size (the stratified bootstrap);
- with several seeds, the seeds are resampled too, but every seed of a replicate sees the *same* resampled images:
  all seeds were evaluated on the one test set, so its sampling error is shared, not averaged away;
- rows are resampled jointly (same images, same seeds in every replicate), which makes their differences paired.

Pure functions of numpy arrays and an explicit seed: the same inputs give the same report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

LEVEL = 0.95
REPLICATES = 2000  # p-values resolve 1/2001: enough for Holm over a dozen comparisons at 0.05
CHUNK_ELEMENTS = 10_000_000  # image draws per pass (about 120 MB of indices and weights)


@dataclass(frozen=True)
class Interval:
    """A point estimate with the ends of its interval (same unit, percent for accuracies)."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float) -> bool:
        return self.low > value or self.high < value


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array; got shape {labels.shape}")
    return labels


def stratified_indices(labels: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """[B, N] image indices: in every replicate, position i holds an image drawn (with replacement, uniformly) from
    the class of image i, so each class keeps its number of test images."""
    labels = _check_labels(labels)
    order = np.argsort(labels, kind="stable")  # images of one class are contiguous in `order`
    classes, start, count = np.unique(labels[order], return_index=True, return_counts=True)
    of_position = np.searchsorted(classes, labels)  # class index of every position
    offset = np.floor(rng.random((replicates, len(labels))) * count[of_position]).astype(np.int64)
    return order[start[of_position] + offset]


def stratified_variance(correct: np.ndarray, labels: np.ndarray) -> float:
    """Exact variance (in squared percent) of the stratified bootstrap's accuracy, sum_c n_c var_c / N^2, var_c the
    within-class population variance of correctness: the closed form the bootstrap estimates by simulation."""
    labels = _check_labels(labels)
    correct = np.asarray(correct, dtype=np.float64)
    total = 0.0
    for c in np.unique(labels):
        values = correct[labels == c]
        total += len(values) * values.var()
    return 1e4 * total / len(labels) ** 2


def bootstrap_accuracies(correct: np.ndarray, labels: np.ndarray, groups: Mapping[str, np.ndarray],
                         replicates: int = REPLICATES, seed: int = 0) -> dict[str, np.ndarray]:
    """Bootstrap replicates of every row's accuracy (percent) in every group of images.

    correct: [R, S, N] bool, row r's seed s right on image n (all rows and seeds on the same N test images).
    groups: name -> [N] bool mask of a group made of whole classes (overall, many, few ...).
    Returns name -> [B, R]: in replicate b, the images are resampled within class once and the seeds with
    replacement once, both shared by all rows; a row's value is the mean over the drawn seeds of its accuracy on
    the drawn images. An empty group gives nan.
    """
    correct = np.asarray(correct, dtype=bool)
    labels = _check_labels(labels)
    if correct.ndim != 3 or correct.shape[2] != len(labels):
        raise ValueError(f"correct must be [rows, seeds, images={len(labels)}]; got shape {correct.shape}")
    rng = np.random.default_rng(seed)
    rows, seeds, images = correct.shape
    flat = correct.reshape(rows * seeds, images).astype(np.float32)  # sums of 0/1 stay exact in float32
    masks = {name: np.asarray(mask, dtype=bool) for name, mask in groups.items()}
    out = {name: np.full((replicates, rows), np.nan) for name in masks}
    chunk = max(1, CHUNK_ELEMENTS // images)  # replicates per pass: bounds the [b, N] index and weight arrays
    for begin in range(0, replicates, chunk):
        size = min(chunk, replicates - begin)
        drawn = stratified_indices(labels, size, rng) + images * np.arange(size)[:, None]
        weights = np.bincount(drawn.ravel(), minlength=size * images).reshape(size, images).astype(np.float32)
        seed_counts = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=size)  # [b, S]
        for name, mask in masks.items():
            if mask.any():  # times each image was drawn x right or not, summed over the group: [b, R * S]
                right = weights[:, mask] @ flat[:, mask].T
                acc = (100.0 * right.astype(np.float64) / mask.sum()).reshape(size, rows, seeds)
                out[name][begin:begin + size] = np.einsum("brs,bs->br", acc, seed_counts) / seeds
    return out


def percentile_interval(replicates: np.ndarray, estimate: float, level: float = LEVEL) -> Interval:
    """The central `level` share of the replicates (percentile bootstrap interval) around `estimate`."""
    replicates = np.asarray(replicates, dtype=np.float64)
    if np.isnan(replicates).any():
        return Interval(estimate, np.nan, np.nan)
    tail = 100.0 * (1.0 - level) / 2
    low, high = np.percentile(replicates, [tail, 100.0 - tail])
    return Interval(float(estimate), float(low), float(high))


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of 'no difference' from bootstrap replicates of a difference: twice the smaller share of
    replicates on either side of 0 (0 counts for both sides), with the +1 that keeps it above 0 and at most 1."""
    differences = np.asarray(differences, dtype=np.float64)
    if np.isnan(differences).any():
        return float("nan")
    below, above = int((differences <= 0).sum()), int((differences >= 0).sum())
    return min(1.0, 2.0 * (1 + min(below, above)) / (1 + len(differences)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control over the given tests); nan stays nan and is
    not counted as a test."""
    values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(len(values), np.nan)
    tested = np.flatnonzero(~np.isnan(values))
    order = tested[np.argsort(values[tested], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * values[index]))
        adjusted[index] = running
    return adjusted.tolist()
