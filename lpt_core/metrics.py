"""Evaluation metrics for LPT: shot-group accuracy, per-class tables, prompt matching statistics, K-NN and gamma.

Everything here is a pure function of tensors. Results are plain dicts of python floats or pyarrow Tables, so an
experiment tracker (MLflow, Ray) can store them without knowing about torch. See lpt-method.md, "Evaluation",
Tab. 2 (K-NN accuracy, gamma) and Fig. 4 (matching consistency).
"""
from __future__ import annotations

import math
from typing import Callable

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------------- shot groups
def _split_standard(counts: Tensor) -> dict[str, Tensor]:
    """OLTR (Liu et al. 2019): many n > 100, medium 20 <= n <= 100, few n < 20."""
    return {"many": counts > 100, "medium": (counts >= 20) & (counts <= 100), "few": counts < 20}


def _split_authors(counts: Tensor) -> dict[str, Tensor]:
    """The LPT code: many n > 100, medium 20 < n <= 100, few n <= 20 (used for the published Places-LT numbers)."""
    return {"many": counts > 100, "medium": (counts > 20) & (counts <= 100), "few": counts <= 20}


SPLIT_RULES: dict[str, Callable[[Tensor], dict[str, Tensor]]] = {
    "standard": _split_standard,
    "authors": _split_authors,
}


def shot_masks(class_counts: Tensor, rule: str = "authors") -> dict[str, Tensor]:
    """Boolean masks [C] for the many / medium / few groups of `class_counts` (training images per class)."""
    if rule not in SPLIT_RULES:
        raise ValueError(f"unknown shot split rule {rule!r}; valid rules: {sorted(SPLIT_RULES)}")
    return SPLIT_RULES[rule](torch.as_tensor(class_counts))


def _shot_names(class_counts: Tensor, rule: str) -> list[str]:
    """The group name of every class under `rule` (the rules partition the classes)."""
    names = [""] * len(class_counts)
    for group, mask in shot_masks(class_counts, rule).items():
        for c in mask.nonzero().flatten().tolist():
            names[c] = group
    return names


# ------------------------------------------------------------------------------------------------ validation
def _check_index(name: str, values: Tensor, upper: int, upper_name: str) -> None:
    """Raise if any entry of `values` lies outside [0, upper)."""
    bad = (values < 0) | (values >= upper)
    if bad.any():
        first = values[bad].flatten()[0].item()
        raise ValueError(f"{name}: {int(bad.sum())} values outside [0, {upper_name}={upper}); first bad value {first}")


def _check_predictions(preds: Tensor, labels: Tensor, class_counts: Tensor) -> int:
    """Validate shapes and ranges; return C."""
    if preds.dim() != 1 or labels.dim() != 1 or class_counts.dim() != 1:
        raise ValueError(f"preds, labels and class_counts must be 1-D; got shapes "
                         f"{tuple(preds.shape)}, {tuple(labels.shape)}, {tuple(class_counts.shape)}")
    if len(preds) != len(labels):
        raise ValueError(f"preds has {len(preds)} entries but labels has {len(labels)}")
    num_classes = len(class_counts)
    _check_index("labels", labels, num_classes, "num_classes")
    _check_index("preds", preds, num_classes, "num_classes")
    return num_classes


def _per_class_counts(preds: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Test samples and correct predictions per class, both int64 [C]."""
    labels = labels.long()
    test_count = torch.bincount(labels, minlength=num_classes)  # [C]
    correct = torch.bincount(labels[preds.long() == labels], minlength=num_classes)  # [C]
    return test_count, correct


def _percent(correct: Tensor, total: Tensor) -> float:
    total = int(total)
    return 100.0 * int(correct) / total if total > 0 else math.nan


# -------------------------------------------------------------------------------------------------- accuracy
def accuracy_report(preds: Tensor, labels: Tensor, class_counts: Tensor) -> dict[str, float]:
    """Top-1 accuracy in percent, overall and per shot group.

    Group accuracies are sample-based (correct / test samples of the group's classes), which is how the paper's
    numbers are computed (6454/13100 many on Places-LT). Keys "many"/"medium"/"few" use the authors' rule,
    "*_std" the standard OLTR rule. "mean_class_acc" averages per-class accuracies over classes with test samples.
    A group without test samples gives nan.
    """
    class_counts = torch.as_tensor(class_counts)
    num_classes = _check_predictions(preds, labels, class_counts)
    test_count, correct = _per_class_counts(preds, labels, num_classes)
    report = {"acc": _percent(correct.sum(), test_count.sum())}
    for rule, suffix in (("authors", ""), ("standard", "_std")):
        for group, mask in shot_masks(class_counts, rule).items():
            report[group + suffix] = _percent(correct[mask].sum(), test_count[mask].sum())
    has_test = test_count > 0
    per_class = correct[has_test].double() / test_count[has_test]
    report["mean_class_acc"] = 100.0 * per_class.mean().item() if has_test.any() else math.nan
    return report


def per_class_table(preds: Tensor, labels: Tensor, class_counts: Tensor,
                    class_names: list[str] | None = None) -> pa.Table:
    """One row per class: counts, accuracy (percent, null without test samples) and shot group under both rules."""
    class_counts = torch.as_tensor(class_counts)
    num_classes = _check_predictions(preds, labels, class_counts)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries but class_counts has {num_classes}")
    test_count, correct = _per_class_counts(preds, labels, num_classes)
    accuracy = [100.0 * c / t if t > 0 else None for c, t in zip(correct.tolist(), test_count.tolist())]
    return pa.table({
        "class_id": pa.array(list(range(num_classes)), pa.int32()),
        "class_name": pa.array(class_names if class_names is not None else [None] * num_classes, pa.string()),
        "train_count": pa.array(class_counts.long().tolist(), pa.int64()),
        "test_count": pa.array(test_count.tolist(), pa.int64()),
        "correct": pa.array(correct.tolist(), pa.int64()),
        "accuracy": pa.array(accuracy, pa.float64()),
        "shot_authors": pa.array(_shot_names(class_counts, "authors"), pa.string()),
        "shot_standard": pa.array(_shot_names(class_counts, "standard"), pa.string()),
    })


def image_groups(labels: Tensor, class_counts: Tensor) -> dict[str, Tensor]:
    """[N] boolean masks over test images for every accuracy of `accuracy_report` ("acc" = all, "many"... under the
    authors' rule, "many_std"... under the standard one): intervals resample exactly the images each one averages."""
    labels, class_counts = torch.as_tensor(labels).long(), torch.as_tensor(class_counts)
    _check_index("labels", labels, len(class_counts), "num_classes")
    groups = {"acc": torch.ones(len(labels), dtype=torch.bool)}
    for rule, suffix in (("authors", ""), ("standard", "_std")):
        for group, mask in shot_masks(class_counts, rule).items():
            groups[group + suffix] = mask[labels]
    return groups


def prediction_table(preds: Tensor, labels: Tensor, class_counts: Tensor, topk_indices: Tensor | None = None,
                     knn_preds: Tensor | None = None, paths: list[str] | None = None) -> pa.Table:
    """One row per evaluated image, in evaluation order: what every interval and paired comparison is computed from.

    image_id is the index in the evaluation split (the same images in the same order for every stage of a dataset);
    path where the dataset has files; train_count is n_c of the image's class, so shot groups need no other file;
    topk the matched prompts (phase 2 / joint); knn_pred the K-NN prediction from the query feature (Tab. 2 / 10).
    """
    class_counts = torch.as_tensor(class_counts)
    _check_predictions(preds, labels, class_counts)
    n = len(labels)
    for name, values in (("topk_indices", topk_indices), ("knn_preds", knn_preds), ("paths", paths)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries but labels has {n}")
    columns = {
        "image_id": pa.array(range(n), pa.int64()),
        "label": pa.array(labels.long().tolist(), pa.int32()),
        "pred": pa.array(preds.long().tolist(), pa.int32()),
        "train_count": pa.array(class_counts.long()[labels.long()].tolist(), pa.int64()),
    }
    if paths is not None:
        columns["path"] = pa.array([str(p) for p in paths], pa.string())
    if topk_indices is not None:
        columns["topk"] = pa.array(topk_indices.long().tolist(), pa.list_(pa.int32()))
    if knn_preds is not None:
        columns["knn_pred"] = pa.array(knn_preds.long().tolist(), pa.int32())
    return pa.table(columns)


# --------------------------------------------------------------------------------------- prompt matching (phase 2)
def _check_matching(labels: Tensor, topk_indices: Tensor, num_classes: int, pool_size: int) -> None:
    if labels.dim() != 1 or topk_indices.dim() != 2 or len(labels) != len(topk_indices):
        raise ValueError(f"expected labels [N] and topk_indices [N, k]; got shapes "
                         f"{tuple(labels.shape)} and {tuple(topk_indices.shape)}")
    _check_index("labels", labels, num_classes, "num_classes")
    _check_index("topk_indices", topk_indices, pool_size, "pool_size")


def match_histogram(labels: Tensor, topk_indices: Tensor, num_classes: int, pool_size: int) -> Tensor:
    """[C, m] int64: how often prompt j is among the top-k matches of samples of class c."""
    _check_matching(labels, topk_indices, num_classes, pool_size)
    flat = (labels.long()[:, None] * pool_size + topk_indices.long()).flatten()  # [N * k] index into C x m
    hist = torch.bincount(flat, minlength=num_classes * pool_size)
    return hist.view(num_classes, pool_size)


def _match_consistency(labels: Tensor, topk_indices: Tensor) -> float:
    """Mean over classes with samples of: share of the class's samples whose top-k set is the class's most common."""
    sets = topk_indices.sort(dim=1).values  # order inside the top-k does not matter: compare sets
    _, set_id = torch.unique(sets, dim=0, return_inverse=True)  # [N]
    num_sets = int(set_id.max()) + 1
    pair, pair_count = torch.unique(labels.long() * num_sets + set_id, return_counts=True)  # (class, set) pairs
    pair_class = pair // num_sets
    classes, class_count = torch.unique(labels.long(), return_counts=True)  # sorted, like pair_class
    best = pair_count.new_zeros(int(classes.max()) + 1).scatter_reduce(0, pair_class, pair_count, "amax")
    return (best[classes].double() / class_count).mean().item()


def _match_entropy(hist: Tensor) -> float:
    """Mean over classes with samples of H(p_c) / log m, p_c the class's prompt histogram normalised to 1.

    With top-k selection a perfectly consistent class still spreads over k prompts, so the floor is log k / log m.
    """
    hist = hist[hist.sum(1) > 0].double()
    pool_size = hist.shape[1]
    if pool_size == 1:
        return 0.0
    p = hist / hist.sum(1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1)  # 0 * log 0 = 0
    return (entropy / math.log(pool_size)).mean().item()


def match_stats(labels: Tensor, topk_indices: Tensor, num_classes: int, pool_size: int) -> dict[str, float]:
    """Fig. 4 statistics: match_consistency, pool_usage and match_entropy (all in [0, 1]; nan without samples)."""
    hist = match_histogram(labels, topk_indices, num_classes, pool_size)
    if len(labels) == 0:
        return {"match_consistency": math.nan, "pool_usage": 0.0, "match_entropy": math.nan}
    return {
        "match_consistency": _match_consistency(labels, topk_indices),
        "pool_usage": (hist.sum(0) > 0).double().mean().item(),
        "match_entropy": _match_entropy(hist),
    }


def match_table(hist: Tensor) -> pa.Table:
    """Long format (class_id, prompt_id, count) of a [C, m] match histogram, zeros included, for heat maps."""
    num_classes, pool_size = hist.shape
    return pa.table({
        "class_id": pa.array(torch.arange(num_classes).repeat_interleave(pool_size).tolist(), pa.int32()),
        "prompt_id": pa.array(torch.arange(pool_size).repeat(num_classes).tolist(), pa.int32()),
        "count": pa.array(hist.flatten().tolist(), pa.int64()),
    })


# ------------------------------------------------------------------------------------- feature quality (Tab. 2)
def _check_features(feats: Tensor, labels: Tensor, name: str) -> None:
    if feats.dim() != 2 or labels.dim() != 1 or len(feats) != len(labels):
        raise ValueError(f"{name}: expected features [N, D] and labels [N]; got shapes "
                         f"{tuple(feats.shape)} and {tuple(labels.shape)}")


def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int = 10,
                chunk: int = 1024) -> Tensor:
    """K-NN top-1 predictions [N_test] with cosine similarity.

    Each test sample takes the majority label of its k most similar training samples; a tie in votes goes to the
    class with the larger summed similarity. Test rows are processed `chunk` at a time: memory is O(chunk * N_train).
    """
    _check_features(train_feats, train_labels, "train")
    if test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"feature widths differ: train {tuple(train_feats.shape)}, test {tuple(test_feats.shape)}")
    if not 1 <= k <= len(train_feats):
        raise ValueError(f"k={k} must lie in [1, number of training samples={len(train_feats)}]")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    train = F.normalize(train_feats.float(), dim=1)
    train_labels = train_labels.long()
    num_classes = int(train_labels.max()) + 1
    preds = []
    for start in range(0, len(test_feats), chunk):
        test = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)  # [b, k]
        neighbours = train_labels[idx]  # [b, k]
        votes = test.new_zeros(len(test), num_classes).scatter_add_(1, neighbours, torch.ones_like(sim))  # [b, C]
        sim_sum = test.new_zeros(len(test), num_classes).scatter_add_(1, neighbours, sim)  # [b, C]
        top_vote = votes == votes.max(1, keepdim=True).values
        preds.append(sim_sum.masked_fill(~top_vote, -math.inf).argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 k: int = 10, chunk: int = 1024) -> float:
    """K-NN top-1 accuracy (percent) of `knn_predict`; nan without test samples."""
    _check_features(test_feats, test_labels, "test")
    preds = knn_predict(train_feats, train_labels, test_feats, k, chunk)
    if len(preds) == 0:
        return math.nan
    return 100.0 * int((preds == test_labels.long()).sum()) / len(preds)


def gamma_ratio(feats: Tensor, labels: Tensor) -> float:
    """Intra/inter-class distance ratio gamma = (1 / (C * D)) * sum_i R_i (Tab. 2; smaller = more separable).

    R_i: mean Euclidean distance of class-i features to the class-i centre; D: mean Euclidean distance between
    pairs of class centres; C: classes present in `labels`. Features are L2-normalised first so that gamma is
    scale invariant: backbones (or prompt-tuned vs. frozen models) with different feature norms stay comparable.
    """
    _check_features(feats, labels, "gamma_ratio")
    classes, cls = torch.unique(labels.long(), return_inverse=True)  # cls: class index in 0..C-1 per sample
    num_classes = len(classes)
    if num_classes < 2:
        raise ValueError(f"gamma_ratio needs >= 2 classes; labels contain {num_classes}")
    x = F.normalize(feats.double(), dim=1)  # [N, D]
    count = torch.bincount(cls, minlength=num_classes).double()  # [C]
    centres = x.new_zeros(num_classes, x.shape[1]).index_add_(0, cls, x) / count[:, None]  # [C, D]
    radius = x.new_zeros(num_classes).index_add_(0, cls, (x - centres[cls]).norm(dim=1)) / count
    centre_dist = torch.pdist(centres).mean()  # D, over the C(C-1)/2 pairs of centres
    if centre_dist == 0:
        raise ValueError("gamma_ratio: all class centres coincide (mean inter-centre distance D = 0)")
    return (radius.sum() / (num_classes * centre_dist)).item()
