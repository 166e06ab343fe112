"""The content-addressed stage store: one folder per stage key (lpt_core.stages.stage_key).

A stage's key is the hash of exactly the config fields it depends on plus its upstream key, so every trial of a
group-size sweep maps to the same phase-1 key and the store trains that phase 1 once, for this sweep and for any
later sweep. A stage folder holds the run's epoch checkpoints while it trains (work/), and once it is done its
verified final checkpoint (final/), results (result.json, per_class.parquet, match.parquet, predictions.parquet:
one row per test image, what report intervals are computed from) and a DONE marker written last. A DONE stage
whose checkpoint fails its checksum is rebuilt, never reused.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

import pyarrow.parquet as pq

from lpt_core.checkpoint import CheckpointError, latest_valid_checkpoint, replace_directory, verify_checkpoint
from lpt_core.files import atomic_write_bytes, file_lock
from lpt_core.train import StageResult

@dataclass
class StageOutput:
    key: str
    metrics: dict[str, float]
    history: list[dict[str, float]]
    checkpoint_dir: Path
    run_id: str | None
    files: dict[str, Path] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    upstream: str | None = None  # key of the stage this one was initialised from (phase 1 under a phase 2)


class StageStore:
    """Stage folders under one root (a shared filesystem on a cluster)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def folder(self, key: str) -> Path:
        return self.root / key

    def work_dir(self, key: str) -> Path:
        return self.folder(key) / "work"

    def lock(self, key: str) -> ContextManager[None]:
        """Exclusive per-stage lock: a second trial needing the same stage waits, then finds it done."""
        return file_lock(self.folder(key) / ".lock")

    def marked_done(self, key: str) -> bool:
        """Whether the stage's DONE mark is there: a cheap look, for what only reports progress (is_done verifies
        the output before anything reads it)."""
        return (self.folder(key) / "DONE").is_file()

    def is_done(self, key: str, log=print) -> bool:
        folder = self.folder(key)
        if not self.marked_done(key):
            return False
        try:
            verify_checkpoint(folder / "final")
            json.loads((folder / "result.json").read_text())
        except (CheckpointError, OSError, json.JSONDecodeError) as err:
            log(f"stage {key}: cached output is damaged ({err}); rebuilding it")
            (folder / "DONE").unlink(missing_ok=True)
            return False
        return True

    def load(self, key: str) -> StageOutput:
        folder = self.folder(key)
        result = json.loads((folder / "result.json").read_text())
        return StageOutput(key, result["metrics"], result["history"], folder / "final", result.get("run_id"),
                           {"per_class": folder / "per_class.parquet", "match": folder / "match.parquet",
                            "predictions": folder / "predictions.parquet"},
                           result.get("extras", {}), result.get("upstream"))

    def latest_checkpoint(self, key: str, log=print) -> Path | None:
        return latest_valid_checkpoint(sorted((self.work_dir(key) / "checkpoints").glob("epoch_*")), log=log)

    def finalize(self, key: str, result: StageResult, run_id: str | None, upstream: str | None = None) -> StageOutput:
        """Publishes a trained stage; `upstream` (the key it was initialised from) lets a report find the phase 1
        under a phase 2 without the tracking server."""
        folder = self.folder(key)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".final-"))
        shutil.copytree(result.checkpoint_dir, tmp, dirs_exist_ok=True)
        verify_checkpoint(tmp)
        replace_directory(tmp, folder / "final")
        pq.write_table(result.per_class, folder / "per_class.parquet")
        if result.match is not None:
            pq.write_table(result.match, folder / "match.parquet")
        if result.predictions is not None:
            pq.write_table(result.predictions, folder / "predictions.parquet")
        payload = {"metrics": result.metrics, "history": result.history, "run_id": run_id, "stage": result.stage,
                   "extras": result.extras, "upstream": upstream}
        atomic_write_bytes(folder / "result.json", json.dumps(payload, indent=1, default=float).encode())
        atomic_write_bytes(folder / "DONE", key.encode())
        return self.load(key)
