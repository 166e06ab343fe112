"""Checkpoints: round trip, checksum, compatibility checks, newest-valid selection, safe loading, atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import lpt_core.checkpoint as ckpt
from lpt_core.checkpoint import (
    META_FILE,
    STATE_FILE,
    BackboneIdentity,
    CheckpointError,
    latest_valid_checkpoint,
    load_checkpoint,
    read_meta,
    replace_directory,
    safe_torch_load,
    save_checkpoint,
    verify_checkpoint,
)

IDENTITY = BackboneIdentity("vit_tiny_patch16_224", "ab" * 32)


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"shared_prompt.tokens": torch.randn(4, 2, 8, generator=g),
                  "head.weight": torch.randn(5, 8, generator=g)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": {"torch": torch.get_rng_state(), "cuda": []},
        "epoch": 3,
        "history": [{"loss": 1.5, "acc": float("nan")}],
    }


def _meta(epoch: int = 3, num_classes: int = 5) -> dict:
    return {"phase": "phase1", "epoch": epoch, "backbone": vars(IDENTITY), "num_classes": num_classes}


def _save(directory: Path, epoch: int = 3) -> Path:
    state = _state()
    state["epoch"] = epoch
    return save_checkpoint(directory, state, _meta(epoch))


def test_round_trip(tmp_path: Path) -> None:
    state = _state()
    folder = save_checkpoint(tmp_path / "ck", state, _meta())
    assert sorted(p.name for p in folder.iterdir()) == sorted([STATE_FILE, META_FILE])  # no temp files left
    loaded, meta = load_checkpoint(folder, IDENTITY, 5)
    for key, tensor in state["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], torch.ones(3))
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert loaded["epoch"] == 3 and loaded["history"][0]["loss"] == 1.5
    assert meta["phase"] == "phase1" and meta["epoch"] == 3 and meta["num_classes"] == 5
    assert meta["sha256"] == hashlib.sha256((folder / STATE_FILE).read_bytes()).hexdigest()
    assert meta["format_version"] == ckpt.FORMAT_VERSION
    assert verify_checkpoint(folder) == meta


def test_load_without_identity_or_classes_skips_those_checks(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ck")
    state, _ = load_checkpoint(folder)
    assert state["epoch"] == 3


def test_flipped_byte_fails_checksum(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ck")
    data = bytearray((folder / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="checksum"):
        verify_checkpoint(folder)


def test_truncated_state_fails_checksum(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ck")
    data = (folder / STATE_FILE).read_bytes()
    (folder / STATE_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(folder, IDENTITY, 5)


def test_missing_meta(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ck")
    (folder / META_FILE).unlink()
    with pytest.raises(CheckpointError, match=META_FILE):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_meta(tmp_path / "nowhere")


def test_unreadable_meta(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ck")
    (folder / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        verify_checkpoint(folder)


def test_missing_state(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ck")
    (folder / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{STATE_FILE} missing"):
        load_checkpoint(folder)


def test_backbone_name_mismatch_names_both(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ck")
    other = BackboneIdentity("vit_small_patch16_224", IDENTITY.weights_digest)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder, other, 5)
    assert "vit_tiny_patch16_224" in str(err.value) and "vit_small_patch16_224" in str(err.value)


def test_backbone_weights_mismatch_names_both_digests(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ck")
    other = BackboneIdentity(IDENTITY.name, "cd" * 32)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder, other, 5)
    assert IDENTITY.weights_digest[:12] in str(err.value) and other.weights_digest[:12] in str(err.value)


def test_backbone_norm_eps_mismatch_names_both_and_the_key(tmp_path: Path) -> None:
    authors = BackboneIdentity(IDENTITY.name, IDENTITY.weights_digest, 1e-5)
    folder = save_checkpoint(tmp_path / "ck", _state(), {**_meta(), "backbone": vars(authors)})
    assert load_checkpoint(folder, authors, 5)[1]["backbone"]["norm_eps"] == 1e-5
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder, IDENTITY, 5)
    assert str(err.value) == (
        f"{folder}: trained with backbone.norm_eps=1e-05, this run has backbone.norm_eps=null (timm's default) "
        f"(the LayerNorm eps changes the backbone's function); set backbone.norm_eps=1e-05 to continue from it")


def test_checkpoint_from_before_norm_eps_reads_as_timm_default(tmp_path: Path) -> None:
    """Meta written before the option existed has no norm_eps: those runs all used timm's default (null)."""
    old_meta = {**_meta(), "backbone": {"name": IDENTITY.name, "weights_digest": IDENTITY.weights_digest}}
    folder = save_checkpoint(tmp_path / "ck", _state(), old_meta)
    assert load_checkpoint(folder, IDENTITY, 5)[0]["epoch"] == 3
    with pytest.raises(CheckpointError, match=r"trained with backbone.norm_eps=null \(timm's default\), this run "
                                              r"has backbone.norm_eps=1e-05"):
        load_checkpoint(folder, BackboneIdentity(IDENTITY.name, IDENTITY.weights_digest, 1e-5), 5)


def test_class_count_mismatch_names_both(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"has 5 classes, the dataset has 7"):
        load_checkpoint(folder, IDENTITY, 7)


def test_latest_valid_checkpoint_skips_corrupted_newest(tmp_path: Path) -> None:
    folders = [_save(tmp_path / f"epoch_{e:04d}", epoch=e) for e in range(3)]
    assert latest_valid_checkpoint(folders) == folders[2]
    data = bytearray((folders[2] / STATE_FILE).read_bytes())
    data[-10] ^= 0xFF
    (folders[2] / STATE_FILE).write_bytes(bytes(data))
    messages: list[str] = []
    assert latest_valid_checkpoint(folders, log=messages.append) == folders[1]
    assert len(messages) == 1 and "checksum" in messages[0] and "epoch_0002" in messages[0]


def test_latest_valid_checkpoint_orders_by_epoch_not_by_list_order(tmp_path: Path) -> None:
    folders = [_save(tmp_path / f"run_{e}", epoch=e) for e in (10, 2, 9)]
    assert latest_valid_checkpoint(folders) == folders[0]
    assert latest_valid_checkpoint(list(reversed(folders))) == folders[0]


def test_latest_valid_checkpoint_none_when_nothing_verifies(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ck")
    (folder / META_FILE).unlink()
    assert latest_valid_checkpoint([folder, tmp_path / "missing"]) is None
    assert latest_valid_checkpoint([]) is None


class _Payload:
    """A custom class: a weights_only load must refuse to rebuild it."""

    def __init__(self) -> None:
        self.value = 1


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("obj", [_Payload(), _RunsCode()], ids=["custom_class", "reduce_to_callable"])
def test_safe_torch_load_refuses_custom_objects(tmp_path: Path, obj: object) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": obj}, path)
    with pytest.raises(CheckpointError, match="refused"):
        safe_torch_load(path)


def test_checkpoint_with_code_is_refused_even_with_valid_checksum(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save({"extra": _Payload()}, folder / STATE_FILE)
    meta = {**_meta(), "sha256": hashlib.sha256((folder / STATE_FILE).read_bytes()).hexdigest()}
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(folder, IDENTITY, 5)


def test_safe_torch_load_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a zip archive at all")
    with pytest.raises(CheckpointError):
        safe_torch_load(path)


def test_safe_torch_load_plain_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3)}, path)
    assert torch.equal(safe_torch_load(path)["w"], torch.arange(3))


def test_save_interrupted_before_meta_leaves_previous_checkpoint_loadable(tmp_path: Path, monkeypatch) -> None:
    folder = _save(tmp_path / "ck", epoch=1)
    calls = []
    real = ckpt.atomic_write_bytes

    def fail_on_meta(path, data):
        calls.append(Path(path).name)
        if Path(path).name == META_FILE:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", fail_on_meta)
    with pytest.raises(KeyboardInterrupt):
        _save(folder, epoch=2)
    monkeypatch.undo()
    assert calls == [STATE_FILE, META_FILE]
    # state.pt is new, meta.json old: the checksum catches the mismatch instead of loading a mixed checkpoint
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(folder)


def test_replace_directory(tmp_path: Path) -> None:
    old = _save(tmp_path / "dst", epoch=1)
    new = _save(tmp_path / "tmp_new", epoch=2)
    replace_directory(new, old)
    assert not new.exists()
    assert read_meta(old)["epoch"] == 2
    fresh = _save(tmp_path / "tmp_fresh", epoch=5)
    replace_directory(fresh, tmp_path / "elsewhere")
    assert read_meta(tmp_path / "elsewhere")["epoch"] == 5


def test_trainer_records_norm_eps_and_refuses_to_continue_on_another(make_config, quiet_hooks, tmp_path: Path) -> None:
    """The identity the trainer writes carries backbone.norm_eps; phase 2 on the other eps is refused."""
    from lpt_core.train import run_stage

    authors = make_config({"backbone": {"norm_eps": 1e-5}, "phase1": {"epochs": 1}})
    phase1 = run_stage(authors, "phase1", tmp_path / "p1", quiet_hooks).checkpoint_dir
    assert read_meta(phase1)["backbone"]["norm_eps"] == 1e-5
    with pytest.raises(CheckpointError, match=r"trained with backbone.norm_eps=1e-05, this run has "
                                              r"backbone.norm_eps=null \(timm's default\)"):
        run_stage(make_config(), "phase2", tmp_path / "p2", quiet_hooks, init_from=phase1)
