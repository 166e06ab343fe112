"""lpt_core.uncertainty: stratified and two-level bootstrap, paired differences, Holm, on hand-computable cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lpt_core.uncertainty import (
    Interval,
    bootstrap_accuracies,
    bootstrap_p_value,
    holm,
    percentile_interval,
    stratified_indices,
    stratified_variance,
)

# 4 balanced classes of 50 test images; class c is right on the first 10 * (c + 1) images: 20/40/60/80 %
LABELS = np.repeat(np.arange(4), 50)
RIGHT = np.concatenate([np.arange(50) < 10 * (c + 1) for c in range(4)])
ALL = {"acc": np.ones(200, dtype=bool)}


def test_stratified_indices_keep_every_image_in_its_class():
    labels = np.array([2, 0, 2, 1, 0, 2])  # unsorted, uneven classes
    idx = stratified_indices(labels, 500, np.random.default_rng(0))
    assert idx.shape == (500, 6)
    assert (labels[idx] == labels).all()  # position i always holds an image of image i's class
    assert set(idx[:, 3]) == {3}  # class 1 has one image: always itself
    assert set(idx[:, 0].tolist()) == {0, 2, 5}  # class 2's three images all get drawn


def test_stratified_variance_of_a_balanced_set_by_hand():
    # sum_c n_c p_c (1 - p_c) / N^2 = 50 * (.16 + .24 + .24 + .16) / 200^2 = 1e-3, i.e. 10 squared points
    assert stratified_variance(RIGHT, LABELS) == pytest.approx(10.0)
    # unstratified it would be p (1 - p) / N = .25 / 200 = 12.5 squared points: stratification matters here


def test_bootstrap_variance_matches_the_closed_form():
    reps = bootstrap_accuracies(RIGHT[None, None], LABELS, ALL, replicates=20000, seed=1)["acc"][:, 0]
    assert reps.mean() == pytest.approx(50.0, abs=4 * math.sqrt(10.0 / 20000))
    # the sample variance of 20000 draws has a relative standard error of about sqrt(2 / 20000) = 1 %
    assert reps.var(ddof=1) == pytest.approx(10.0, rel=0.05)
    assert abs(reps.var(ddof=1) - 12.5) > 1.5  # not the unstratified variance


def test_classes_all_right_or_all_wrong_give_a_zero_width_interval():
    right = LABELS < 2  # classes 0, 1 right, 2, 3 wrong: every within-class resample is the same
    reps = bootstrap_accuracies(right[None, None], LABELS, {**ALL, "few": LABELS >= 2}, replicates=300)
    assert set(reps["acc"][:, 0]) == {50.0} and set(reps["few"][:, 0]) == {0.0}
    assert percentile_interval(reps["acc"][:, 0], 50.0) == Interval(50.0, 50.0, 50.0)
    assert stratified_variance(right, LABELS) == 0.0


def test_identical_rows_differ_by_exactly_zero():
    both = np.stack([RIGHT, RIGHT])[:, None]  # [2 rows, 1 seed, N]
    reps = bootstrap_accuracies(both, LABELS, ALL, replicates=500)["acc"]
    diffs = reps[:, 1] - reps[:, 0]
    assert (diffs == 0).all()
    assert percentile_interval(diffs, 0.0) == Interval(0.0, 0.0, 0.0)
    assert bootstrap_p_value(diffs) == 1.0


def test_paired_difference_of_a_dominating_row():
    # one class of 100 images; row B is right wherever A is, and on 50 images more: the paired difference is
    # 100 * Binomial(100, 1/2) / 100, never <= 0 in practice, so p = 2 / (B + 1); its variance is 25 squared points
    labels = np.zeros(100, dtype=int)
    a, b = np.arange(100) < 20, np.arange(100) < 70
    reps = bootstrap_accuracies(np.stack([a, b])[:, None], labels, {"acc": labels == 0}, replicates=4000)["acc"]
    diffs = reps[:, 1] - reps[:, 0]
    assert (diffs > 0).all()
    assert bootstrap_p_value(diffs) == pytest.approx(2 / 4001)
    assert diffs.var(ddof=1) == pytest.approx(25.0, rel=0.1)  # 2.2 % relative standard error at 4000 draws
    # an unpaired bootstrap would add both rows' variances: 16 + 21 = 37 squared points, not 25
    assert diffs.var(ddof=1) < 31


def test_seeds_are_resampled_and_share_the_resampled_images():
    # seed 0 right everywhere, seed 1 nowhere: only the seed draw matters; the mean of two drawn seeds is
    # 0, 50 or 100 with probabilities 1/4, 1/2, 1/4
    right = np.stack([np.ones(200, bool), np.zeros(200, bool)])[None]  # [1 row, 2 seeds, N]
    reps = bootstrap_accuracies(right, LABELS, ALL, replicates=4000)["acc"][:, 0]
    assert set(reps) == {0.0, 50.0, 100.0}
    assert np.mean(reps == 50.0) == pytest.approx(0.5, abs=0.03)  # 4 standard errors at 4000 draws
    assert percentile_interval(reps, 50.0) == Interval(50.0, 0.0, 100.0)


def test_two_identical_seeds_keep_the_full_test_set_variance():
    # the same images are drawn for every seed: two identical seeds must not halve the image-sampling variance
    right = np.stack([RIGHT, RIGHT])[None]
    reps = bootstrap_accuracies(right, LABELS, ALL, replicates=20000, seed=2)["acc"][:, 0]
    assert reps.var(ddof=1) == pytest.approx(10.0, rel=0.05)


def test_an_empty_group_gives_nan():
    reps = bootstrap_accuracies(RIGHT[None, None], LABELS, {"none": np.zeros(200, bool)}, replicates=10)
    assert np.isnan(reps["none"]).all()
    interval = percentile_interval(reps["none"][:, 0], math.nan)
    assert math.isnan(interval.low) and math.isnan(interval.high)
    assert math.isnan(bootstrap_p_value(reps["none"][:, 0]))


def test_same_seed_same_replicates_and_shape_checks():
    one = bootstrap_accuracies(RIGHT[None, None], LABELS, ALL, replicates=50, seed=7)["acc"]
    two = bootstrap_accuracies(RIGHT[None, None], LABELS, ALL, replicates=50, seed=7)["acc"]
    assert (one == two).all()
    with pytest.raises(ValueError, match=r"correct must be \[rows, seeds, images=200\]"):
        bootstrap_accuracies(RIGHT[None], LABELS, ALL)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        stratified_indices(np.array([]), 1, np.random.default_rng(0))


def test_p_value_counts_both_sides():
    assert bootstrap_p_value(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 / 4)  # none <= 0: 2 (1 + 0) / 4
    assert bootstrap_p_value(np.array([-1.0, 2.0, 3.0])) == pytest.approx(1.0)  # 2 (1 + 1) / 4 = 1
    assert bootstrap_p_value(-np.arange(1.0, 100.0)) == pytest.approx(2 / 100)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.01, math.nan, 0.02])  # nan is not a test: m = 2
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert holm([]) == []


def test_interval_helpers():
    interval = Interval(51.4, 50.0, 52.0)
    assert interval.half_width == pytest.approx(1.0)
    assert interval.excludes(0.0) and not interval.excludes(51.0)
