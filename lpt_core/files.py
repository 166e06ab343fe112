"""Three file helpers every layer shares: atomic writes, exclusive file locks and content keys.

Checkpoints, stage results, sweep state, caches (dataset manifests, the demo's images and backbone) and the
tracking spool are all written with `atomic_write_bytes`; the sweep folder, each stage and each demo backbone
are guarded by `file_lock`; stage keys, the sweep fingerprint and every cache name are `content_key`s.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class FileLocked(RuntimeError):
    """Another process holds the lock; `holder` is what it wrote into the lock file ("pid 1234")."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder = path, holder


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one: a temp file
    in the same folder, fsynced, renamed over `path`, then the folder fsynced (the rename survives a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True,
              on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Holds an exclusive flock on `path` (created with its folder) for the `with` block; the holder writes its
    pid into the file. When another process holds it: wait=False raises FileLocked naming the holder; wait=True
    calls on_wait(holder) once, then blocks until it is free."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                raise FileLocked(path, holder) from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def content_key(content: Any, length: int = 16) -> str:
    """The first `length` hex digits of the sha256 of `content` as canonical JSON (sorted keys, str() for what
    JSON cannot hold): equal content, equal key, in every process and on every machine."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:length]
