"""Measure 5: the list-file JPEG pipeline (manifest + decode + augment) against what the model consumes.

A list-file dataset of real JPEG files (256 x 256, smooth random colour fields with noise, so they compress like
photos rather than like flat colour) is written to the scratch folder and built through the registered "lt_list"
dataset, exactly as Places-LT / ImageNet-LT are. Timed: building the manifest (cache miss: parse + check files,
then cache hit), and a DataLoader over the training split with the recipe's train transform (RandomResizedCrop
224 + flip + normalise) at several worker counts, interleaved. The model's consumption is the ViT-S images/s
of measure 1 on the same device.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.context import Context
from benchmarks.measures.throughput import images_per_s
from benchmarks.timing import Stats, interleaved
from lpt_core.config import DataConfig
from lpt_core.data import build_dataset

TITLE = "5. Data pipeline against model consumption"
SIZE = 256
NUM_CLASSES = 20
CONSUMER = "vit_s"


def write_jpegs(root: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """`count` training JPEGs with long-tailed labels plus a small test split; returns the two list files."""
    rng = np.random.default_rng(seed)
    weights = 0.9 ** np.arange(NUM_CLASSES)
    labels = np.concatenate([np.arange(NUM_CLASSES), rng.choice(NUM_CLASSES, count - NUM_CLASSES,
                                                                p=weights / weights.sum())])
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "test": []}
    for i, label in enumerate(labels):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        name = f"images/{i:05d}.jpg"
        Image.fromarray(pixels).save(root / name, quality=90)
        lines["train"].append(f"{name} {label}")
        if i < 2 * NUM_CLASSES:
            lines["test"].append(f"{name} {i % NUM_CLASSES}")
    paths = []
    for split, rows in lines.items():
        path = root / f"{split}.txt"
        path.write_text("\n".join(rows) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def loader_pass(dataset, batch_size: int, workers: int) -> dict[str, float]:
    """One epoch over `dataset`: seconds to the first batch (worker start) and images/s of the rest."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=False)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    images, rest = 0, time.perf_counter()
    for images_batch, _ in iterator:
        images += images_batch.shape[0]
    steady = time.perf_counter() - rest
    return {"first_batch_s": first, "images_per_s": images / steady if images else math.nan}


def run(ctx: Context) -> dict[str, Any]:
    root = ctx.work / "jpeg_list"
    start = time.perf_counter()
    train_list, test_list = write_jpegs(root, ctx.plan.data_images)
    written = time.perf_counter() - start
    cfg = DataConfig(name="lt_list", root=str(root), cache_dir=str(ctx.work / "cache"),
                     options={"train_list": str(train_list), "test_list": str(test_list)})
    manifest = {}
    for label in ("cache miss", "cache hit"):
        start = time.perf_counter()
        bundle = build_dataset(cfg)
        manifest[label] = time.perf_counter() - start
    passes: dict[int, list[dict[str, float]]] = {w: [] for w in ctx.plan.data_workers}
    batch = min(ctx.plan.data_batch, len(bundle.train) // 2)
    interleaved({str(w): (lambda w=w: passes[w].append(loader_pass(bundle.train, batch, w)))
                 for w in ctx.plan.data_workers}, ctx.plan.repeats, warmup=0)
    loader = {str(w): {"images_per_s": Stats.of([p["images_per_s"] for p in runs]).as_dict(),
                       "first_batch_s": Stats.of([p["first_batch_s"] for p in runs]).as_dict()}
              for w, runs in passes.items()}
    best = max(v["images_per_s"]["median"] for v in loader.values())
    consumers = {phase: images_per_s(ctx.sections.get("throughput", {}), CONSUMER, phase)
                 for phase in ("phase1", "phase2")}
    fastest_model = max((v for v in consumers.values() if v), default=None)
    per_worker = loader.get("1", {}).get("images_per_s", {}).get("median")
    section = {"title": TITLE, "device": str(ctx.device), "images": len(bundle.train), "jpeg_size": SIZE,
               "jpeg_bytes_mean": float(np.mean([p.stat().st_size for p in (root / "images").iterdir()])),
               "write_s": written, "manifest_s": manifest, "batch": batch, "loader": loader,
               "model_images_per_s": consumers, "loader_best_images_per_s": best}
    if fastest_model:
        section["loader_over_model"] = best / fastest_model
        section["bottleneck"] = best < fastest_model
        section["met"] = best >= fastest_model
        if per_worker:
            section["workers_needed"] = math.ceil(fastest_model / per_worker)
    ctx.stamp(f"data: best loader {best:.0f} img/s vs model {fastest_model} img/s")
    return section


def loader_seconds(section: dict[str, Any] | None, images: int, img_size: int) -> float | None:
    """Seconds the 0-worker loader of measure 5 takes for `images` images (224 px pipelines only)."""
    if not section or img_size != 224 or "0" not in section["loader"]:
        return None
    return images / section["loader"]["0"]["images_per_s"]["median"]


def markdown(section: dict[str, Any]) -> str:
    m = section["manifest_s"]
    lines = [f"{section['images']} JPEG files ({section['jpeg_size']} px, {section['jpeg_bytes_mean'] / 1024:.0f} KiB "
             f"on average) through the registered `lt_list` dataset; loader batch {section['batch']}, recipe train "
             f"transform (RandomResizedCrop 224 + flip + normalise), device {section['device']}.", "",
             f"Manifest: {m['cache miss']:.3g} s to parse and check the lists (cache miss), "
             f"{m['cache hit']:.3g} s from the cached Parquet file.", "",
             "| num_workers | images/s median (min-max) | first batch s (worker start) |", "|---|---|---|"]
    for w, v in section["loader"].items():
        lines.append(f"| {w} | {Stats(**v['images_per_s']).fmt()} | {Stats(**v['first_batch_s']).fmt()} |")
    models = section["model_images_per_s"]
    if section.get("loader_over_model") is not None:
        lines += ["", f"Model consumption at {CONSUMER} (measure 1): phase 1 {models['phase1']:.3g} img/s, "
                      f"phase 2 {models['phase2']:.3g} img/s. Best loader / fastest model = "
                      f"{section['loader_over_model']:.3g}x: the loader is "
                      f"{'the bottleneck' if section['bottleneck'] else 'not the bottleneck'}"
                      + (f"; {section['workers_needed']} worker(s) keep up" if "workers_needed" in section else "")
                      + "."]
    else:
        lines += ["", "Model consumption not measured in this run (measure 1 skipped)."]
    return "\n".join(lines)


def summary(section: dict[str, Any]) -> list[dict[str, Any]]:
    if section.get("loader_over_model") is None:
        return [{"measure": TITLE, "target": "loader faster than the model", "result": "model not measured",
                 "met": None}]
    return [{"measure": TITLE, "target": "loader not the bottleneck (ViT-S)",
             "result": f"best loader {section['loader_best_images_per_s']:.0f} img/s = "
                       f"{section['loader_over_model']:.3g}x the model", "met": section["met"]}]
