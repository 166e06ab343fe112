"""Evaluation passes: predictions, matched prompts and query features on the eval split, and feature statistics.

No noise and no margin at evaluation: predictions are the argmax of the cosine logits, dropout is off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from lpt_core.metrics import gamma_ratio, knn_predict
from lpt_core.config import LPTConfig
from lpt_core.data import DatasetBundle
from lpt_core.model import LPTModel, shared_phase2_pass, shared_phase2_queries
from lpt_core.runtime import autocast


@dataclass
class EvalOutput:
    preds: torch.Tensor  # [N]
    labels: torch.Tensor  # [N]
    query: torch.Tensor  # [N, D] query features (phase-1 feature in phase 1), float32 on CPU
    topk_idx: torch.Tensor | None  # [N, k] matched prompts (phase 2 / joint)


@torch.no_grad()
def evaluate(model: LPTModel, dataset: Dataset, stage: str, device: torch.device, cfg: LPTConfig) -> EvalOutput:
    model.eval()
    loader = DataLoader(dataset, batch_size=cfg.data.eval_batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    preds, labels, queries, topk = [], [], [], []
    for images, y in loader:
        with autocast(device, cfg.precision):
            out = model(images.to(device, non_blocking=True), stage)
        preds.append(out.logits.argmax(dim=-1).cpu())
        labels.append(y)
        queries.append(out.query.float().cpu())
        if out.topk_idx is not None:
            topk.append(out.topk_idx.cpu())
    return EvalOutput(torch.cat(preds), torch.cat(labels).long(), torch.cat(queries), torch.cat(topk) if topk else None)


@dataclass
class QueryFeatures:
    query: torch.Tensor  # [N, D] float32 on CPU
    labels: torch.Tensor  # [N]


def train_queries(model: LPTModel, bundle: DatasetBundle, stage: str, device: torch.device,
                  cfg: LPTConfig) -> QueryFeatures:
    """The query features of the training split (the K-NN's reference set)."""
    train = evaluate(model, bundle.train_eval, stage, device, cfg)
    return QueryFeatures(train.query, train.labels)


def feature_statistics(train: QueryFeatures, test: EvalOutput, cfg: LPTConfig) -> tuple[dict[str, float], torch.Tensor]:
    """K-NN accuracy (train -> eval split) and gamma of the query features (Tab. 2 / Tab. 10), and the K-NN
    predictions [N] behind that accuracy (stored per image, so the K-NN accuracy gets an interval too)."""
    knn_preds = knn_predict(train.query, train.labels, test.query, k=cfg.eval.knn_k)
    knn_acc = 100.0 * int((knn_preds == test.labels).sum()) / len(knn_preds) if len(knn_preds) else math.nan
    return {"query_knn_acc": knn_acc, "query_gamma": gamma_ratio(test.query, test.labels)}, knn_preds


@torch.no_grad()
def train_queries_of_rows(models: Sequence[LPTModel], bundle: DatasetBundle, device: torch.device,
                          cfg: LPTConfig) -> list[QueryFeatures]:
    """`train_queries` of fused phase-2 rows in one pass: the query pass once per batch and query function."""
    loader = DataLoader(bundle.train_eval, batch_size=cfg.data.eval_batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    found: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    for model in models:
        model.eval()
    for images, y in loader:
        with autocast(device, cfg.precision):
            queries = shared_phase2_queries(models, images.to(device, non_blocking=True))
        labels.append(y)
        for row, query in zip(found, queries):
            row.append(query.float().cpu())
    return [QueryFeatures(torch.cat(row), torch.cat(labels).long()) for row in found]


def image_paths(dataset: Dataset) -> list[str] | None:
    """The evaluation images' file paths in evaluation order, where the dataset reads files (None for generated
    data, whose images are identified by their index alone)."""
    paths = getattr(dataset, "paths", None)
    if paths is None:
        return None
    return [str(p) for p in (paths.to_pylist() if hasattr(paths, "to_pylist") else paths)]


@torch.no_grad()
def evaluate_rows(models: Sequence[LPTModel], dataset: Dataset, device: torch.device,
                  cfg: LPTConfig) -> list[EvalOutput]:
    """`evaluate` of fused phase-2 rows over one pass of the dataset (their shared part computed once a batch)."""
    for model in models:
        model.eval()
    loader = DataLoader(dataset, batch_size=cfg.data.eval_batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    parts: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in models]
    labels = []
    for images, y in loader:
        with autocast(device, cfg.precision):
            rows = shared_phase2_pass(models, images.to(device, non_blocking=True))
            logits = [model.classify(row.feature) for model, row in zip(models, rows)]
        labels.append(y)
        for found, row, row_logits in zip(parts, rows, logits):
            found.append((row_logits.argmax(dim=-1).cpu(), row.query.float().cpu(), row.topk_idx.cpu()))
    return [EvalOutput(torch.cat([p[0] for p in found]), torch.cat(labels).long(), torch.cat([p[1] for p in found]),
                       torch.cat([p[2] for p in found])) for found in parts]
