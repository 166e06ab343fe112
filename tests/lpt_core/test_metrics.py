"""Tests for lpt_core.metrics: tiny tensors with hand-computed answers, plus the real Places-LT split counts."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from lpt_core.metrics import (
    SPLIT_RULES,
    accuracy_report,
    gamma_ratio,
    image_groups,
    knn_accuracy,
    knn_predict,
    match_histogram,
    match_stats,
    match_table,
    per_class_table,
    prediction_table,
    shot_masks,
)

# Tiny 4-class problem shared by the accuracy tests.
# train counts: class 0 = 200 (many), class 1 = 20 (authors: few, standard: medium), class 2 = 10 (few),
# class 3 = 5 (few, and it has no test samples).
COUNTS = torch.tensor([200, 20, 10, 5])
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
PREDS = torch.tensor([0, 0, 0, 1, 1, 0, 2, 0, 0])
# correct per class: class 0 3/4, class 1 1/2, class 2 1/3, class 3 0/0; overall 5/9.


def _places_train_counts(shared_data: Path) -> torch.Tensor:
    """Training images per class from the "relative/path label" lines of Places_LT_train.txt."""
    lines = (shared_data / "places_lt" / "Places_LT_train.txt").read_text().splitlines()
    counter = Counter(int(line.split()[-1]) for line in lines if line.strip())
    return torch.tensor([counter[c] for c in range(max(counter) + 1)])


# ------------------------------------------------------------------------------------------------ shot masks
def test_shot_masks_boundaries():
    counts = torch.tensor([101, 100, 21, 20, 19, 5])
    authors = shot_masks(counts, "authors")
    assert authors["many"].tolist() == [True, False, False, False, False, False]
    assert authors["medium"].tolist() == [False, True, True, False, False, False]
    assert authors["few"].tolist() == [False, False, False, True, True, True]
    standard = shot_masks(counts, "standard")
    assert standard["many"].tolist() == [True, False, False, False, False, False]
    assert standard["medium"].tolist() == [False, True, True, True, False, False]
    assert standard["few"].tolist() == [False, False, False, False, True, True]


def test_shot_masks_default_is_authors_and_rules_registered():
    assert set(SPLIT_RULES) == {"standard", "authors"}
    counts = torch.tensor([20])
    assert shot_masks(counts)["few"].item()


def test_shot_masks_unknown_rule_lists_valid_rules():
    with pytest.raises(ValueError, match=r"'oltr'.*\['authors', 'standard'\]"):
        shot_masks(torch.tensor([5]), "oltr")


def test_places_lt_split_counts(shared_data):
    counts = _places_train_counts(shared_data)
    assert len(counts) == 365
    assert counts.sum() == 62_500
    assert counts.max() == 4980 and counts.min() == 5
    sizes = {rule: [int(m.sum()) for m in shot_masks(counts, rule).values()] for rule in SPLIT_RULES}
    assert sizes["authors"] == [131, 157, 77]
    assert sizes["standard"] == [131, 163, 71]


# -------------------------------------------------------------------------------------------------- accuracy
def test_accuracy_report_hand_computed():
    r = accuracy_report(PREDS, LABELS, COUNTS)
    assert r["acc"] == pytest.approx(100 * 5 / 9)
    # authors: many = class 0 -> 3/4; medium = no class in (20, 100] -> nan; few = classes 1,2,3 -> (1+1)/(2+3)
    assert r["many"] == pytest.approx(75.0)
    assert math.isnan(r["medium"])
    assert r["few"] == pytest.approx(40.0)
    # standard: many = class 0 -> 3/4; medium = class 1 -> 1/2; few = classes 2,3 -> 1/3
    assert r["many_std"] == pytest.approx(75.0)
    assert r["medium_std"] == pytest.approx(50.0)
    assert r["few_std"] == pytest.approx(100 / 3)
    # mean over the classes that have test samples: (75 + 50 + 33.33) / 3
    assert r["mean_class_acc"] == pytest.approx((75 + 50 + 100 / 3) / 3)
    assert all(type(v) is float for v in r.values())


def test_accuracy_report_reproduces_released_places_checkpoint(shared_data):
    counts = _places_train_counts(shared_data)
    num_classes = len(counts)
    labels = torch.arange(num_classes).repeat_interleave(100)  # 100 test images per class
    preds = (labels + 1) % num_classes  # all wrong ...
    groups = shot_masks(counts, "authors")
    for group, n_correct in (("many", 6454), ("medium", 8212), ("few", 3610)):
        in_group = groups[group][labels].nonzero().flatten()
        hit = in_group[:n_correct]  # ... except exactly n_correct samples of each group
        preds[hit] = labels[hit]
    r = accuracy_report(preds, labels, counts)
    assert r["acc"] == pytest.approx(18276 / 36500 * 100)
    assert r["many"] == pytest.approx(6454 / 13100 * 100)
    assert r["medium"] == pytest.approx(8212 / 15700 * 100)
    assert r["few"] == pytest.approx(3610 / 7700 * 100)
    assert (round(r["acc"], 2), round(r["many"], 2), round(r["medium"], 2), round(r["few"], 2)) == (
        50.07, 49.27, 52.31, 46.88)
    # the standard rule moves 6 classes from few to medium; many is unchanged and the totals still add up
    assert r["many_std"] == r["many"]
    assert r["medium_std"] * 163 + r["few_std"] * 71 == pytest.approx(8212 + 3610)


def test_accuracy_report_validation():
    with pytest.raises(ValueError, match="preds has 2 entries but labels has 3"):
        accuracy_report(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), COUNTS)
    with pytest.raises(ValueError, match=r"labels: 2 values outside \[0, num_classes=4\); first bad value 7"):
        accuracy_report(torch.tensor([0, 1, 2]), torch.tensor([0, 7, -1]), COUNTS)


def test_per_class_table():
    table = per_class_table(PREDS, LABELS, COUNTS)
    assert table.schema.names == ["class_id", "class_name", "train_count", "test_count", "correct", "accuracy",
                                  "shot_authors", "shot_standard"]
    assert table.schema.field("class_id").type == pa.int32()
    assert table.schema.field("train_count").type == pa.int64()
    assert table.schema.field("accuracy").type == pa.float64()
    rows = table.to_pydict()
    assert rows["class_id"] == [0, 1, 2, 3]
    assert rows["class_name"] == [None] * 4
    assert rows["train_count"] == [200, 20, 10, 5]
    assert rows["test_count"] == [4, 2, 3, 0]
    assert rows["correct"] == [3, 1, 1, 0]
    assert rows["accuracy"][:3] == pytest.approx([75.0, 50.0, 100 / 3])
    assert rows["accuracy"][3] is None
    assert rows["shot_authors"] == ["many", "few", "few", "few"]
    assert rows["shot_standard"] == ["many", "medium", "few", "few"]
    named = per_class_table(PREDS, LABELS, COUNTS, class_names=["a", "b", "c", "d"])
    assert named.column("class_name").to_pylist() == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        per_class_table(PREDS, LABELS, COUNTS, class_names=["a", "b"])


def test_image_groups_average_to_the_accuracy_report():
    groups = image_groups(LABELS, COUNTS)
    assert set(groups) == {"acc", "many", "medium", "few", "many_std", "medium_std", "few_std"}
    assert groups["few"].tolist() == [False] * 4 + [True] * 5  # classes 1 and 2 are few under the authors' rule
    assert groups["few_std"].tolist() == [False] * 6 + [True] * 3
    right = (PREDS == LABELS).double()
    report = accuracy_report(PREDS, LABELS, COUNTS)
    for key, mask in groups.items():
        expected = 100 * right[mask].mean().item() if mask.any() else math.nan
        assert report[key] == pytest.approx(expected, nan_ok=True), key


def test_prediction_table_one_row_per_image():
    topk = torch.tensor([[0, 1]] * 9)
    knn = torch.tensor([0, 1, 0, 0, 1, 1, 2, 2, 0])
    paths = [f"img/{i}.jpg" for i in range(9)]
    table = prediction_table(PREDS, LABELS, COUNTS, topk, knn, paths)
    assert table.schema.names == ["image_id", "label", "pred", "train_count", "path", "topk", "knn_pred"]
    rows = table.to_pydict()
    assert rows["image_id"] == list(range(9))
    assert rows["label"] == LABELS.tolist() and rows["pred"] == PREDS.tolist()
    assert rows["train_count"] == [200] * 4 + [20] * 2 + [10] * 3
    assert rows["path"][4] == "img/4.jpg" and rows["topk"][0] == [0, 1] and rows["knn_pred"] == knn.tolist()
    bare = prediction_table(PREDS, LABELS, COUNTS)
    assert bare.schema.names == ["image_id", "label", "pred", "train_count"]
    with pytest.raises(ValueError, match="knn_preds has 2 entries but labels has 9"):
        prediction_table(PREDS, LABELS, COUNTS, knn_preds=torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------ prompt matching
# 3 classes (class 2 has no samples), pool of m = 5 prompts, top-2.
M_LABELS = torch.tensor([0, 0, 0, 1, 1])
M_TOPK = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2], [3, 2]])


def test_match_histogram():
    hist = match_histogram(M_LABELS, M_TOPK, num_classes=3, pool_size=5)
    assert hist.tolist() == [[2, 2, 1, 1, 0], [0, 0, 2, 2, 0], [0, 0, 0, 0, 0]]


def test_match_stats_hand_computed():
    s = match_stats(M_LABELS, M_TOPK, num_classes=3, pool_size=5)
    # class 0: sets {0,1},{0,1},{2,3} -> 2/3; class 1: {2,3} twice -> 1; class 2 has no samples: mean = 5/6
    assert s["match_consistency"] == pytest.approx(5 / 6)
    # prompts 0..3 are used, prompt 4 never: 4/5
    assert s["pool_usage"] == pytest.approx(0.8)
    # class 0: p = (1/3, 1/3, 1/6, 1/6, 0): H = 2/3 ln 3 + 1/3 ln 6 = 1.329661, / ln 5 = 0.826165
    # class 1: p = (0, 0, 1/2, 1/2, 0): H = ln 2, / ln 5 = 0.430677; mean = 0.628421
    assert s["match_entropy"] == pytest.approx((0.826165 + 0.430677) / 2, abs=1e-6)
    assert all(type(v) is float for v in s.values())


def test_match_validation_and_table():
    bad_topk = M_TOPK.clone()
    bad_topk[1, 0] = 5
    with pytest.raises(ValueError, match=r"topk_indices: 1 values outside \[0, pool_size=5\); first bad value 5"):
        match_histogram(M_LABELS, bad_topk, num_classes=3, pool_size=5)
    table = match_table(match_histogram(M_LABELS, M_TOPK, 3, 5))
    assert table.num_rows == 15
    assert table.schema.names == ["class_id", "prompt_id", "count"]
    rows = table.to_pylist()
    assert rows[1] == {"class_id": 0, "prompt_id": 1, "count": 2}
    assert rows[7] == {"class_id": 1, "prompt_id": 2, "count": 2}


# ---------------------------------------------------------------------------------------------------- K-NN
def test_knn_accuracy_clustered_points():
    centres = torch.eye(3) * 5  # three well separated directions
    train_labels = torch.arange(3).repeat_interleave(20)
    train = centres[train_labels] + 0.3 * torch.randn(60, 3)
    test_labels = torch.arange(3).repeat_interleave(7)
    test = centres[test_labels] + 0.3 * torch.randn(21, 3)
    assert knn_accuracy(train, train_labels, test, test_labels, k=5, chunk=4) == pytest.approx(100.0)
    assert knn_accuracy(train, train_labels, test, (test_labels + 1) % 3, k=5) == pytest.approx(0.0)


def test_knn_majority_then_similarity_tiebreak():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    train_labels = torch.tensor([0, 1, 1])
    # test (1, 0): similarities 1.0 (class 0), 0.8 and 0.6 (class 1); k=3: class 1 has 2 votes and wins
    assert knn_accuracy(train, train_labels, torch.tensor([[2.0, 0.0]]), torch.tensor([1]), k=3) == 100.0
    # k=2 on training points 0 and 2 only: one vote each, tie -> larger similarity sum wins
    two, two_labels = train[[0, 2]], train_labels[[0, 2]]
    # test (0.8, 0.6): sim to (1,0) = 0.8, to (0.6,0.8) = 0.96 -> class 1
    # test (1, 0.1) normalised: sim to (1,0) = 0.995, to (0.6,0.8) = 0.677 -> class 0
    test = torch.tensor([[0.8, 0.6], [1.0, 0.1]])
    assert knn_accuracy(two, two_labels, test, torch.tensor([1, 0]), k=2, chunk=1) == 100.0
    assert knn_predict(two, two_labels, test, k=2, chunk=1).tolist() == [1, 0]
    assert knn_predict(two, two_labels, test[:0], k=2).tolist() == []
    with pytest.raises(ValueError, match="k=4"):
        knn_accuracy(train, train_labels, test, torch.tensor([1, 0]), k=4)


# --------------------------------------------------------------------------------------------------- gamma
def test_gamma_ratio_two_classes():
    # After L2 normalisation: class 0 = (1,0),(0,1), centre (.5,.5); class 1 = (-1,0),(0,-1), centre (-.5,-.5).
    # R_0 = R_1 = sqrt(0.5); D = |centre_0 - centre_1| = sqrt(2); gamma = (2 sqrt(.5)) / (2 sqrt(2)) = 0.5.
    feats = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0], [0.0, -7.0]])  # scales differ on purpose
    labels = torch.tensor([4, 4, 9, 9])  # label values need not be contiguous
    assert gamma_ratio(feats, labels) == pytest.approx(0.5)
    # one point per class: R_i = 0 -> gamma = 0
    assert gamma_ratio(feats[[0, 2]], labels[[0, 2]]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=">= 2 classes"):
        gamma_ratio(feats[:2], labels[:2])
