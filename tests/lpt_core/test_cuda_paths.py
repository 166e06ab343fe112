"""The CUDA-only code paths: bf16 autocast by default on CUDA, and the CUDA RNG states a checkpoint saves and a
resume restores. The CUDA tests run wherever CUDA exists and are skipped elsewhere with the reason; the CPU tests
cover everything in those paths that does not need CUDA (the precision rule, bf16 autocast on the CPU, a checkpoint
with CUDA RNG states resumed on a CPU-only machine)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from lpt_core.checkpoint import STATE_FILE, read_meta, safe_torch_load, save_checkpoint
from lpt_core.config import LPTConfig
from lpt_core.runtime import autocast, uses_bf16
from lpt_core.train import run_stage

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason=f"needs CUDA: torch.cuda.is_available() is False here (torch "
                                       f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
TIMING_KEYS = {"epoch_time_s", "train_images_per_s"}


def _state(checkpoint: Path) -> dict:
    return safe_torch_load(checkpoint / STATE_FILE)


def _matmul_dtype(device: torch.device, precision: str) -> torch.dtype:
    a = torch.ones(4, 4, device=device)
    with autocast(device, precision):
        return (a @ a).dtype


@pytest.mark.parametrize("device, precision, bf16", [
    ("cuda", "auto", True), ("cuda", "bf16", True), ("cuda", "fp32", False),
    ("cpu", "auto", False), ("cpu", "bf16", True), ("cpu", "fp32", False)])
def test_precision_rule(device: str, precision: str, bf16: bool) -> None:
    assert uses_bf16(torch.device(device), precision) is bf16


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp32", torch.float32)])
def test_autocast_on_cpu(precision: str, dtype: torch.dtype) -> None:
    assert _matmul_dtype(torch.device("cpu"), precision) == dtype


def test_a_checkpoint_with_cuda_rng_states_resumes_on_a_cpu(make_config: Callable[..., LPTConfig], tmp_path: Path,
                                                            quiet_hooks) -> None:
    """A CPU run saves no CUDA RNG state; a checkpoint written on a GPU (it holds them) resumes on a CPU-only node,
    ignoring them, exactly as the CPU run continues."""
    cfg = make_config({"phase1": {"epochs": 3}})
    straight = run_stage(cfg, "phase1", tmp_path / "straight", quiet_hooks, keep_checkpoints=3)
    epoch0 = tmp_path / "straight" / "checkpoints" / "epoch_0000"
    state = _state(epoch0)
    assert state["rng"]["cuda"] == []
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as torch.cuda.get_rng_state_all() on one GPU
    from_gpu = save_checkpoint(tmp_path / "from_gpu" / "checkpoints" / "epoch_0000", state, read_meta(epoch0))
    resumed = run_stage(cfg, "phase1", tmp_path / "from_gpu", quiet_hooks, resume_from=from_gpu)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    for a, b in zip(straight.history, resumed.history):
        assert {k: v for k, v in b.items() if k not in TIMING_KEYS} == \
            pytest.approx({k: v for k, v in a.items() if k not in TIMING_KEYS}, abs=1e-6, nan_ok=True)


@needs_cuda
def test_bf16_autocast_on_cuda_by_default(make_config: Callable[..., LPTConfig], tmp_path: Path,
                                          quiet_hooks) -> None:
    cuda = torch.device("cuda")
    assert _matmul_dtype(cuda, "auto") == torch.bfloat16 and _matmul_dtype(cuda, "fp32") == torch.float32
    result = run_stage(make_config({"device": "cuda"}), "phase1", tmp_path, quiet_hooks)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert any("on cuda" in line for line in quiet_hooks.lines)


@needs_cuda
def test_cuda_rng_states_are_saved_and_restored(make_config: Callable[..., LPTConfig], tmp_path: Path,
                                                quiet_hooks) -> None:
    """A-GCL's Gaussian cloud draws from the CUDA generator: the state after epoch 1 of a run resumed after epoch 0
    equals the straight run's only if the resume restored it (it moved between the two epochs)."""
    cfg = make_config({"device": "cuda", "phase1": {"epochs": 2}})
    run_stage(cfg, "phase1", tmp_path / "straight", quiet_hooks, keep_checkpoints=2)
    straight = [_state(tmp_path / "straight" / "checkpoints" / f"epoch_{e:04d}")["rng"]["cuda"] for e in (0, 1)]
    assert len(straight[0]) == torch.cuda.device_count()
    assert not torch.equal(straight[0][0], straight[1][0])  # training consumed CUDA random numbers
    epoch0 = tmp_path / "straight" / "checkpoints" / "epoch_0000"
    resumed_dir = tmp_path / "resumed" / "checkpoints" / "epoch_0000"
    save_checkpoint(resumed_dir, _state(epoch0), read_meta(epoch0))
    run_stage(cfg, "phase1", tmp_path / "resumed", quiet_hooks, resume_from=resumed_dir)
    resumed = _state(tmp_path / "resumed" / "checkpoints" / "epoch_0001")["rng"]["cuda"]
    for a, b in zip(straight[1], resumed):
        assert torch.equal(a, b)
