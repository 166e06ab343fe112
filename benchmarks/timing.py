"""Repeated, interleaved timing: warm-up first, then A and B alternate within one process, so a ratio compares
runs that shared the same machine state (load from other processes, thermal state, allocator) instead of two
absolute numbers taken minutes apart.

Every measure is a list of samples summarised as median and min-max. A comparison is the list of per-round
ratios (round r: B_r / A_r), summarised the same way: the median of ratios, not the ratio of medians.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

Sync = Callable[[], None]


def _no_sync() -> None:
    return None


@dataclass
class Stats:
    """Summary of repeated samples (seconds, images/s or a ratio)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        if not samples:
            raise ValueError("Stats.of: no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}

    def fmt(self, digits: int = 3) -> str:
        return f"{self.median:.{digits}g} ({self.min:.{digits}g}-{self.max:.{digits}g})"

    def fmt_ratio(self) -> str:
        """Ratios near 1 with two decimals, so 1.49 and 1.50 read differently."""
        return f"{self.median:.2f} ({self.min:.2f}-{self.max:.2f})"


def time_call(fn: Callable[[], object], sync: Sync = _no_sync) -> float:
    """Wall seconds of one call; `sync` waits for queued device work before and after (CUDA)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(cases: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                sync: Sync = _no_sync) -> dict[str, list[float]]:
    """Seconds per call of each case, `repeats` rounds after `warmup` untimed rounds.

    Within a round every case runs once; the order is rotated from round to round (A B C, B C A, ...) so that no
    case always runs first (cold caches) or last (after the others' garbage).
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_call(cases[name], sync))
    return samples


def ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-round ratios numerator_r / denominator_r of two interleaved sample lists."""
    if len(numerator) != len(denominator):
        raise ValueError(f"ratios: {len(numerator)} vs {len(denominator)} samples; interleave them")
    return [a / b for a, b in zip(numerator, denominator)]


def throughput(seconds: list[float], items: int) -> Stats:
    """items/s of each sample, summarised."""
    return Stats.of([items / s for s in seconds])


class PartTimer:
    """Accumulates the wall time of consecutive parts of one step: `out = timer("backward", fn)`."""

    def __init__(self, sync: Sync = _no_sync) -> None:
        self.sync = sync
        self.parts: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], object]):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start
        return out
