"""What every measure receives: the mode's sizes (quick or full, CPU or GPU), the device, a scratch folder, the
sections measured so far, and a cache of built models (a random-weight ViT-B takes seconds to initialise)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.steps import build_model
from lpt_core.model import LPTModel


@dataclass(frozen=True)
class Plan:
    """Sizes of one mode. Batches are per branch: a dual step trains on twice as many images."""

    warmup: int
    repeats: int
    throughput: dict[str, int]  # measure 1: shape -> per-branch batch
    naive: dict[str, int]  # measure 2: shape -> per-branch batch
    profile: tuple[str, ...]  # measure 2: shapes profiled part by part
    data_images: int  # measure 5: JPEG files written
    data_batch: int  # measure 5: loader batch size
    data_workers: tuple[int, ...]
    sweep_rounds: int  # measures 3-4: interleaved rounds of (sweep cached, plain loop, sweep uncached)
    demo_overrides: tuple[str, ...]  # measures 3-4: trial length on the demo
    demo_rows: tuple[int, ...] | None = None  # measures 3-4: group sizes swept (None: all four, 5 10 20 40)
    gpu_batch: int = 128  # measure 6: ViT-B/16 per-branch batch


# quick: one short epoch per phase (and two of the four group sizes: each trial start costs seconds)
DEMO_QUICK = ("phase1.epochs=1", "phase2.epochs=1", "phase1.warmup_epochs=0",
              "phase2.warmup_epochs=0", "phase1.steps_per_epoch=2", "phase2.steps_per_epoch=2",
              "eval.every_epochs=1", "eval.feature_stats=false")
DEMO_FULL = ("phase1.epochs=2", "phase2.epochs=2", "phase1.steps_per_epoch=20", "phase2.steps_per_epoch=20")

PLANS: dict[tuple[bool, str], Plan] = {
    (True, "cpu"): Plan(warmup=1, repeats=3, throughput={"micro": 32, "vit_t": 1, "vit_s": 1},
                        naive={"vit_s": 1}, profile=("vit_s",), data_images=128, data_batch=32,
                        data_workers=(0, 1, 2), sweep_rounds=1, demo_overrides=DEMO_QUICK, demo_rows=(5, 10)),
    (False, "cpu"): Plan(warmup=1, repeats=5, throughput={"micro": 64, "vit_t": 8, "vit_s": 8, "vit_b": 8},
                         naive={"vit_s": 8, "vit_b": 8}, profile=("vit_s", "vit_b"), data_images=1024,
                         data_batch=256, data_workers=(0, 1, 2), sweep_rounds=1, demo_overrides=DEMO_FULL),
    (True, "cuda"): Plan(warmup=3, repeats=5, throughput={"micro": 256, "vit_t": 64, "vit_s": 64, "vit_b": 32},
                         naive={"vit_s": 64, "vit_b": 32}, profile=("vit_b",), data_images=512, data_batch=128,
                         data_workers=(0, 2, 4, 8), sweep_rounds=1, demo_overrides=DEMO_QUICK, gpu_batch=64),
    (False, "cuda"): Plan(warmup=5, repeats=10, throughput={"micro": 256, "vit_t": 128, "vit_s": 128, "vit_b": 64},
                          naive={"vit_s": 128, "vit_b": 64}, profile=("vit_s", "vit_b"), data_images=2048,
                          data_batch=256, data_workers=(0, 2, 4, 8, 12), sweep_rounds=1,
                          demo_overrides=DEMO_FULL, gpu_batch=128),
}


@dataclass
class Context:
    quick: bool
    device: torch.device
    threads: int
    out: Path
    work: Path  # scratch folder, removed at the end unless --keep-work
    plan: Plan
    cache_dir: Path  # data.cache_dir shared by every demo run (the micro ViT is pretrained into it once)
    fixed_costs: bool = True  # measures 3-4: also run the fixed-cost probe (benchmarks/fixed_costs.py)
    sections: dict[str, Any] = field(default_factory=dict)  # measure name -> its results section
    shared: dict[str, Any] = field(default_factory=dict)  # results several measures read (the demo runs)
    log: Callable[[str], None] = print
    _models: dict[str, LPTModel] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        """The project's default: bf16 autocast on CUDA, fp32 on CPU."""
        return "bf16" if self.device.type == "cuda" else "fp32"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def model(self, shape: str) -> LPTModel:
        if shape not in self._models:
            self._models[shape] = build_model(shape, self.device)
        return self._models[shape]

    def release_models(self) -> None:
        self._models.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def stamp(self, message: str) -> None:
        self.log(f"[{time.strftime('%H:%M:%S')}] {message}")
