"""Device, precision and seeding: resolved from the config in one place, never read from globals elsewhere."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import torch

from lpt_core.config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: CUDA is not available on this machine (use device=cpu or auto)")
    return device


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast on CUDA by default (the frozen backbone tolerates it; the loss runs in fp32), fp32 on CPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; the CPU allocator raises a RuntimeError that says so."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def release_cached_memory(device: torch.device) -> None:
    """After an out-of-memory error: hand the caching allocator's blocks back (a packed neighbour may need them)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def seed_everything(seed: int, threads: int | None = None) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: left as they are) inside the block, restored after it: work
    done in a process that goes on with other work (the sweep driver pretraining a demo backbone, a cost probe) on
    the threads its config asks for. With torch's default (every core) beside other busy processes, the OpenMP
    threads spin at each barrier and run many times slower than the one thread asked."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
