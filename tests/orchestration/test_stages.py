"""Stage keys, stage chains and the content-addressed stage store (with a real, tiny lpt_core phase-1 run)."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from lpt_core.config import DataConfig, LPTConfig, from_dict
from lpt_core.data import DATASETS, DatasetBundle, Normalization, register_dataset
from lpt_core.train import StageHooks, run_stage
from lpt_core.stages import stage_chain, stage_key
from orchestration.execute.stage_store import StageStore

# a dataset of its own (not lpt_core's test_blobs) so test order between packages never matters
DATASET = "orch_stage_blobs"
MICRO_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)
COUNTS = [12, 6, 4]


def _blobs(cfg: DataConfig, norm: Normalization) -> DatasetBundle:
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(len(COUNTS), 3, cfg.img_size, cfg.img_size, generator=g)

    def split(counts: list[int]) -> TensorDataset:
        xs = torch.cat([protos[c] + 0.3 * torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=g)
                        for c, n in enumerate(counts)])
        ys = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
        return TensorDataset(xs, ys)

    train = split(COUNTS)
    return DatasetBundle(DATASET, len(COUNTS), train, split([4] * len(COUNTS)), train.tensors[1], torch.tensor(COUNTS))


if DATASET not in DATASETS:
    register_dataset(DATASET)(_blobs)


class Quiet(StageHooks):
    def log(self, message: str) -> None:
        pass


# ---------------------------------------------------------------------------------------------- stage keys

@pytest.fixture
def lpt() -> LPTConfig:
    return LPTConfig()


def with_(cfg: LPTConfig, dotted: str, value) -> LPTConfig:
    out = copy.deepcopy(cfg)
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, value)
    return out


@pytest.mark.parametrize("dotted, value", [
    ("prompt.pool_size", 5), ("prompt.top_k", 3), ("prompt.ensemble", "concat"), ("prompt.query", "pretrained"),
    ("phase2.base_lr", 0.5), ("phase2.loss.eta", 0.1), ("phase2.sampling", "instance"), ("device", "cpu"),
    ("threads", 3), ("joint.epochs", 3),
])
def test_phase1_key_ignores_what_phase1_does_not_read(lpt: LPTConfig, dotted: str, value) -> None:
    assert stage_key("phase1", with_(lpt, dotted, value), None) == stage_key("phase1", lpt, None)


@pytest.mark.parametrize("dotted, value", [
    ("phase1.base_lr", 0.5), ("phase1.loss.name", "ce"), ("phase1.epochs", 3), ("prompt.length", 4),
    ("prompt.shared", False), ("backbone.name", "vit_small_patch16_224"), ("backbone.weights_file", "/w.pt"),
    ("data.root", "/elsewhere"), ("data.options", {"tau": 10}), ("seed", 1),
])
def test_phase1_key_follows_what_phase1_reads(lpt: LPTConfig, dotted: str, value) -> None:
    assert stage_key("phase1", with_(lpt, dotted, value), None) != stage_key("phase1", lpt, None)


def test_phase2_key_follows_its_fields_and_upstream(lpt: LPTConfig) -> None:
    base = stage_key("phase2", lpt, "phase1-a")
    assert base.startswith("phase2-")
    assert stage_key("phase2", with_(lpt, "prompt.pool_size", 5), "phase1-a") != base
    assert stage_key("phase2", lpt, "phase1-b") != base
    assert stage_key("phase2", with_(lpt, "device", "cpu"), "phase1-a") == base


def test_salt_changes_every_key(lpt: LPTConfig) -> None:
    plain, salted = stage_chain(lpt), stage_chain(lpt, salt="trial-1")
    assert all(a.key != b.key for a, b in zip(plain, salted))
    assert stage_key("phase1", lpt, None, "s") == stage_key("phase1", lpt, None, "s")


def test_stage_chain_decoupled(lpt: LPTConfig) -> None:
    chain = stage_chain(lpt)
    assert [s.stage for s in chain] == ["phase1", "phase2"]
    assert chain[0].upstream is None and chain[1].upstream == chain[0].key
    assert chain[0].key == stage_key("phase1", lpt, None)


def test_stage_chain_run_until_phase1(lpt: LPTConfig) -> None:
    chain = stage_chain(lpt, run_until="phase1")
    assert [s.stage for s in chain] == ["phase1"] and chain[0].key == stage_chain(lpt)[0].key


def test_stage_chain_joint(lpt: LPTConfig) -> None:
    chain = stage_chain(with_(lpt, "training", "joint"))
    assert [(s.stage, s.upstream) for s in chain] == [("joint", None)]


def test_stage_keys_keep_their_values(lpt: LPTConfig) -> None:
    """Stages stored by earlier versions are found again: the same config, the same keys."""
    assert [s.key for s in stage_chain(lpt)] == ["phase1-8a89d1175894490a", "phase2-927507eb8bc530e0"]
    assert stage_key("joint", lpt, None) == "joint-666c76cd3464ae95"
    assert stage_key("phase1", lpt, None, "sweep/5/seed=0") == "phase1-5aa3e4863a82dafe"


def test_group_size_rows_share_phase1(lpt: LPTConfig) -> None:
    chains = [stage_chain(with_(lpt, "prompt.pool_size", m)) for m in (5, 10, 20, 40)]
    assert len({c[0].key for c in chains}) == 1
    assert len({c[1].key for c in chains}) == 4


# ---------------------------------------------------------------------------------------------- stage store

@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):
    """(store, key, StageResult): a real 3-epoch phase 1 trained in the store's work folder, not yet finalized."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **MICRO_VIT)
    weights = root / "micro_vit.safetensors"
    save_file(model.state_dict(), str(weights))
    phase = {"epochs": 3, "batch_size": 8, "base_lr": 1.0, "warmup_epochs": 0, "steps_per_epoch": 1}
    cfg = from_dict({
        "backbone": {"name": "vit_tiny_patch16_224", "weights_file": str(weights), "model_kwargs": MICRO_VIT},
        "data": {"name": DATASET, "img_size": 16, "resize_size": 16, "eval_batch_size": 64},
        "prompt": {"length": 2, "pool_size": 3}, "phase1": phase, "phase2": phase,
        "eval": {"every_epochs": 100, "feature_stats": False}, "device": "cpu", "threads": 1,
    })
    store = StageStore(root / "store")
    key = stage_chain(cfg)[0].key
    result = run_stage(cfg, "phase1", store.work_dir(key), Quiet(), keep_checkpoints=3)
    return store, key, result


def test_unfinished_stage_is_not_done(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    assert not store.is_done("phase1-0000")
    assert store.latest_checkpoint("phase1-0000") is None


def test_finalize_then_done_and_load(finished) -> None:
    store, key, result = finished
    out = store.finalize(key, result, run_id="run-123", upstream="phase0-up")
    assert store.is_done(key)
    loaded = store.load(key)
    assert loaded.metrics == pytest.approx(result.metrics, nan_ok=True) and out.metrics == loaded.metrics
    assert loaded.run_id == "run-123" and len(loaded.history) == 3
    assert loaded.checkpoint_dir == store.folder(key) / "final"
    assert (loaded.checkpoint_dir / "state.pt").is_file() and (loaded.checkpoint_dir / "meta.json").is_file()
    assert loaded.files["per_class"].is_file()
    assert (store.folder(key) / "DONE").read_text() == key
    assert loaded.upstream == "phase0-up"  # a report finds the phase 1 under a phase 2 without MLflow
    predictions = pq.read_table(loaded.files["predictions"]).to_pydict()  # one row per test image, for intervals
    assert len(predictions["image_id"]) == sum(result.per_class.column("test_count").to_pylist())
    right = sum(p == y for p, y in zip(predictions["pred"], predictions["label"]))
    assert 100.0 * right / len(predictions["pred"]) == pytest.approx(result.metrics["acc"])


def test_latest_checkpoint_skips_a_corrupted_newest(finished) -> None:
    store, key, _ = finished
    newest = store.latest_checkpoint(key)
    assert newest is not None and newest.name == "epoch_0002"
    state = newest / "state.pt"
    original = state.read_bytes()
    try:
        _flip_byte(state)
        lines: list[str] = []
        assert store.latest_checkpoint(key, log=lines.append).name == "epoch_0001"
        assert any("epoch_0002" in line and "checksum" in line for line in lines)
    finally:
        state.write_bytes(original)
    assert store.latest_checkpoint(key).name == "epoch_0002"


def test_damaged_final_checkpoint_is_rebuilt_not_reused(finished) -> None:
    store, key, result = finished
    if not store.is_done(key):
        store.finalize(key, result, run_id=None)
    _flip_byte(store.folder(key) / "final" / "state.pt")
    lines: list[str] = []
    assert not store.is_done(key, log=lines.append)
    assert not (store.folder(key) / "DONE").exists()
    assert lines and key in lines[0] and "damaged" in lines[0]
    store.finalize(key, result, run_id=None)  # rebuilding replaces the damaged output
    assert store.is_done(key)


def test_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    probe = ("import fcntl, sys\n"
             "handle = open(sys.argv[1], 'w')\n"
             "try:\n    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except BlockingIOError:\n    sys.exit(3)\n")
    lock_file = str(store.folder("phase1-k") / ".lock")
    with store.lock("phase1-k"):
        held = subprocess.run([sys.executable, "-c", probe, lock_file], timeout=30)
    free = subprocess.run([sys.executable, "-c", probe, lock_file], timeout=30)
    assert held.returncode == 3
    assert free.returncode == 0


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
