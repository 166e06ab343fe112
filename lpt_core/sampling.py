"""Batch indices for dual sampling: a class-balanced (cb) and an instance-balanced (ib) stream.

Both samplers own a CPU `torch.Generator` and a few cursors, and nothing else, so `state_dict()` captures them
exactly and a resumed run draws the very same batches as an uninterrupted one. The state holds only tensors and
ints (loadable with `torch.load(weights_only=True)`).

Every stream is a "cycle": a permutation consumed in order and reshuffled when it runs out, so each item appears
exactly once per pass. The class-aware sampler nests cycles: a cycle over classes, and for each class a cycle over
that class's images (one segment of a flat `pool`, grouped by class once with a stable argsort).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from lpt_core.losses import BRANCHES, Branch, beta_schedule

# sampling mode -> branches drawn each step (StageConfig.sampling)
SAMPLING_BRANCHES: dict[str, tuple[str, ...]] = {
    "dual": ("cb", "ib"),
    "class_balanced": ("cb",),
    "instance": ("ib",),
}


class BatchSampler(Protocol):
    def next_batch(self, batch_size: int) -> Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _take_cyclic(cycle: Tensor, cursor: int, count: int, generator: torch.Generator) -> tuple[Tensor, int]:
    """Takes `count` items of `cycle` from `cursor` on; returns them and the new cursor.

    `cursor == len(cycle)` means the pass is over: `cycle` (possibly a view into a larger tensor) is reshuffled in
    place before the next item is taken, so each item appears once per pass even when `count` spans passes.
    """
    parts = []
    while count > 0:
        if cursor == len(cycle):
            cycle.copy_(cycle[torch.randperm(len(cycle), generator=generator)])
            cursor = 0
        take = min(count, len(cycle) - cursor)
        parts.append(cycle[cursor:cursor + take].clone())  # a copy: a later reshuffle rewrites `cycle`
        cursor += take
        count -= take
    return torch.cat(parts), cursor


def _check_state(state: dict[str, Any], expected: dict[str, int], owner: str) -> None:
    """Refuses a state saved for another dataset or setting, which would silently resume different batches."""
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(f"{owner}.load_state_dict: saved {key}={state.get(key)}, this sampler has {value}")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"next_batch: batch_size={batch_size} must be >= 1")


def _seeded(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


class ClassAwareSampler:
    """Class-balanced batches: shuffled classes in turn, `images_per_class` images of each drawn class.

    Only classes present in `labels` are drawn. A batch may end in the middle of a class's chunk of images;
    the next batch finishes that chunk first.
    """

    def __init__(self, labels: Tensor, images_per_class: int, generator_seed: int) -> None:
        if labels.ndim != 1 or labels.numel() == 0:
            raise ValueError(f"ClassAwareSampler: labels must be a non-empty 1-D tensor, got {tuple(labels.shape)}")
        if images_per_class < 1:
            raise ValueError(f"ClassAwareSampler: images_per_class={images_per_class} must be >= 1")
        self.images_per_class = images_per_class
        self.num_samples = labels.numel()
        labels = labels.long().cpu()
        _, counts = torch.unique(labels, return_counts=True)  # [K] images of each present class
        starts = torch.cumsum(counts, 0) - counts
        self._bounds = list(zip(starts.tolist(), (starts + counts).tolist()))  # segment of each class in pool
        self._generator = _seeded(generator_seed)
        self._pool = torch.argsort(labels, stable=True)  # [N] image indices grouped by class
        self._pool_cursor = counts.tolist()  # per class; at the end = reshuffle before the first draw
        self._class_order = torch.arange(len(counts))  # [K] positions among the present classes, not labels
        self._class_cursor = len(counts)
        self._current_class = -1
        self._chunk_left = 0  # images still owed to _current_class

    def _next_class(self) -> int:
        drawn, self._class_cursor = _take_cyclic(self._class_order, self._class_cursor, 1, self._generator)
        return int(drawn)

    def _take_from_class(self, k: int, count: int) -> Tensor:
        start, end = self._bounds[k]
        images, self._pool_cursor[k] = _take_cyclic(self._pool[start:end], self._pool_cursor[k], count,
                                                    self._generator)
        return images

    def next_batch(self, batch_size: int) -> Tensor:
        """[batch_size] int64 dataset indices."""
        _check_batch_size(batch_size)
        chunks = []
        need = batch_size
        while need > 0:
            if self._chunk_left == 0:
                self._current_class = self._next_class()
                self._chunk_left = self.images_per_class
            take = min(need, self._chunk_left)
            chunks.append(self._take_from_class(self._current_class, take))
            self._chunk_left -= take
            need -= take
        return torch.cat(chunks)

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "num_classes": len(self._bounds),
            "images_per_class": self.images_per_class,
            "generator": self._generator.get_state(),
            "pool": self._pool.clone(),
            "pool_cursor": torch.tensor(self._pool_cursor, dtype=torch.int64),
            "class_order": self._class_order.clone(),
            "class_cursor": self._class_cursor,
            "current_class": self._current_class,
            "chunk_left": self._chunk_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, {"num_samples": self.num_samples, "num_classes": len(self._bounds),
                             "images_per_class": self.images_per_class}, "ClassAwareSampler")
        self._generator.set_state(state["generator"])
        self._pool = state["pool"].clone()
        self._pool_cursor = state["pool_cursor"].tolist()
        self._class_order = state["class_order"].clone()
        self._class_cursor = int(state["class_cursor"])
        self._current_class = int(state["current_class"])
        self._chunk_left = int(state["chunk_left"])


class InstanceSampler:
    """Instance-balanced batches: a shuffled permutation of the dataset consumed in order, epoch-like."""

    def __init__(self, num_samples: int, generator_seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"InstanceSampler: num_samples={num_samples} must be >= 1")
        self.num_samples = num_samples
        self._generator = _seeded(generator_seed)
        self._perm = torch.arange(num_samples)  # [N]
        self._cursor = num_samples  # at the end = reshuffle before the first draw

    def next_batch(self, batch_size: int) -> Tensor:
        """[batch_size] int64 dataset indices."""
        _check_batch_size(batch_size)
        batch, self._cursor = _take_cyclic(self._perm, self._cursor, batch_size, self._generator)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "generator": self._generator.get_state(),
            "perm": self._perm.clone(),
            "cursor": self._cursor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, {"num_samples": self.num_samples}, "InstanceSampler")
        self._generator.set_state(state["generator"])
        self._perm = state["perm"].clone()
        self._cursor = int(state["cursor"])


def build_sampler(branch: Branch, labels: Tensor, *, images_per_class: int, seed: int) -> BatchSampler:
    """The sampler that feeds `branch`: class-aware for "cb", instance for "ib"."""
    if branch == "cb":
        return ClassAwareSampler(labels, images_per_class, seed)
    if branch == "ib":
        return InstanceSampler(labels.numel(), seed)
    raise ValueError(f"branch={branch!r}: unknown branch; valid: {list(BRANCHES)}")


def steps_per_epoch(num_samples: int, batch_size: int, override: int | None = None) -> int:
    """floor(N / B) + 1 as in the authors' code, unless StageConfig.steps_per_epoch overrides it."""
    if override is not None:
        return override
    return num_samples // batch_size + 1


def branches_for(sampling: str) -> tuple[str, ...]:
    """Branches drawn at each step: ("cb", "ib") for dual sampling, one of them otherwise."""
    if sampling not in SAMPLING_BRANCHES:
        raise ValueError(f"sampling={sampling!r}: unknown sampling; valid: {list(SAMPLING_BRANCHES)}")
    return SAMPLING_BRANCHES[sampling]


def branch_weight(branch: str, sampling: str, epoch: int, epochs: int, eta: float) -> float:
    """beta of a branch's losses: under dual sampling the ib batch gets beta_schedule, the cb batch 1.

    A single-branch mode keeps weight 1: its only batch is the whole signal, so it must not fade out.
    """
    branches = branches_for(sampling)
    if branch not in branches:
        raise ValueError(f"branch={branch!r} is not drawn under sampling={sampling!r}; valid: {list(branches)}")
    if sampling == "dual" and branch == "ib":
        return beta_schedule(epoch, epochs, eta)
    return 1.0
