"""Evaluation passes: predictions, matched prompts and query features on the eval split, and feature statistics.

No noise and no margin at evaluation: predictions are the argmax of the cosine logits, dropout is off.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from lpt_core import metrics as M
from lpt_core.config import LPTConfig
from lpt_core.data import DatasetBundle
from lpt_core.model import LPTModel
from lpt_core.runtime import autocast


@dataclass
class EvalOutput:
    preds: torch.Tensor  # [N]
    labels: torch.Tensor  # [N]
    query: torch.Tensor  # [N, D] query features (phase-1 feature in phase 1), float32 on CPU
    topk_idx: torch.Tensor | None  # [N, k] matched prompts (phase 2 / joint)


@torch.no_grad()
def evaluate(model: LPTModel, dataset: Dataset, phase: str, device: torch.device, cfg: LPTConfig) -> EvalOutput:
    model.eval()
    loader = DataLoader(dataset, batch_size=cfg.data.eval_batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    preds, labels, queries, topk = [], [], [], []
    for images, y in loader:
        with autocast(device, cfg.precision):
            out = model(images.to(device, non_blocking=True), phase)
        preds.append(out.logits.argmax(dim=-1).cpu())
        labels.append(y)
        queries.append(out.query.float().cpu())
        if out.topk_idx is not None:
            topk.append(out.topk_idx.cpu())
    return EvalOutput(torch.cat(preds), torch.cat(labels).long(), torch.cat(queries), torch.cat(topk) if topk else None)


def feature_statistics(model: LPTModel, bundle: DatasetBundle, test: EvalOutput, phase: str,
                       device: torch.device, cfg: LPTConfig) -> dict[str, float]:
    """K-NN accuracy (train -> eval split) and gamma of the query features (Tab. 2 / Tab. 10)."""
    train = evaluate(model, bundle.train_eval, phase, device, cfg)
    return {
        "query_knn_acc": M.knn_accuracy(train.query, train.labels, test.query, test.labels, k=cfg.eval.knn_k),
        "query_gamma": M.gamma_ratio(test.query, test.labels),
    }
