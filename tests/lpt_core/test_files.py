"""lpt_core/files.py: atomic writes, file locks, content keys (and that every cache name keeps its value)."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

import lpt_core.files as files
from lpt_core.config import DataConfig
from lpt_core.data.synthetic import SOURCE_KEYS, TARGET_KEYS, DemoOptions
from lpt_core.files import FileLocked, atomic_write_bytes, content_key, file_lock


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["file.bin"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_atomic_write_keeps_old_file_when_interrupted(tmp_path: Path, monkeypatch, failing: str) -> None:
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old content")

    def boom(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(files.os, failing, boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(path, b"new content that never lands")
    monkeypatch.undo()
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["file.bin"], "the temp file must be removed"


def test_atomic_write_keeps_old_file_when_write_raises_midway(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old content")
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError("no space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="no space"):
        atomic_write_bytes(path, b"0123456789" * 100)
    monkeypatch.undo()
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_lock_refuses_without_waiting_and_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "sub" / ".lock"
    with file_lock(path):
        with pytest.raises(FileLocked, match=f"locked by pid {os.getpid()}") as refused:
            with file_lock(path, wait=False):
                raise AssertionError("a second holder was given the lock")
        assert refused.value.holder == f"pid {os.getpid()}"
    with file_lock(path, wait=False):  # released: free again
        assert path.read_text() == f"pid {os.getpid()}"


def test_a_waiting_locker_is_told_then_gets_the_lock_after_the_holder(tmp_path: Path) -> None:
    path, order = tmp_path / ".lock", []
    holding, told, release = threading.Event(), threading.Event(), threading.Event()

    def holder() -> None:
        with file_lock(path):
            holding.set()
            release.wait(timeout=60)
            order.append("holder done")

    def on_wait(who: str) -> None:
        order.append(f"told {who}")
        told.set()

    thread = threading.Thread(target=holder)
    thread.start()
    assert holding.wait(timeout=60)
    def waiter() -> None:
        with file_lock(path, on_wait=on_wait):
            order.append("got")

    waiting = threading.Thread(target=waiter)
    waiting.start()
    assert told.wait(timeout=60)
    assert order == [f"told pid {os.getpid()}"]  # the waiter is blocked while the holder holds the lock
    release.set()
    thread.join()
    waiting.join(timeout=60)
    assert order == [f"told pid {os.getpid()}", "holder done", "got"]


def old_key(content) -> str:
    """The formula each cache used before lpt_core.files existed (stages and the plan with default=str)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("content", [
    {"version": 1, "dataset": "lt_list", "root": "/data/x", "sources": {"train": "ab" * 32}, "extra": "",
     "check_files": True, "verify": False, "skip": False},
    {"name": "vit_tiny_patch16_224", "model_kwargs": {"img_size": 32, "depth": 6}, "source": "1728768f58a19e0b",
     "pretrain": {"epochs": 8, "lr": 1e-3, "flip": True}},
    {"stage": "phase1", "upstream": None, "salt": "", "fields": {"prompt.length": 10, "seed": 0, "eps": None}},
])
def test_content_key_is_the_formula_of_the_earlier_caches(content) -> None:
    assert content_key(content) == old_key(content)
    assert content_key(content, 8) == old_key(content)[:8]


def test_content_key_takes_what_json_cannot_hold_as_text() -> None:
    assert content_key({"path": Path("/a")}) == content_key({"path": "/a"})
    assert content_key({"a": 1, "b": 2}) == content_key({"b": 2, "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 1.5})


def test_demo_cache_names_keep_their_values() -> None:
    """The demo images cached by earlier versions are found again: the same options (the earlier default of 20
    test images per class), the same file names; the larger default test split keeps the source split's name, so
    the cached micro ViT is not pretrained again."""
    options = DemoOptions.from_config(DataConfig(name="demo", options={"test_per_class": 20}))
    assert (options.digest(), options.digest(*SOURCE_KEYS), options.digest(*TARGET_KEYS)) == \
        ("044fabbdfc243fd6", "1728768f58a19e0b", "f9939a1a795b8899")
    assert DemoOptions.from_config(DataConfig()).digest(*SOURCE_KEYS) == "1728768f58a19e0b"
