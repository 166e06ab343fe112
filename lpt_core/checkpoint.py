"""Small, safe, verifiable checkpoints.

A checkpoint is a folder: `state.pt` (trainable tensors, optimizer, samplers, RNG: loadable with
`torch.load(weights_only=True)`, so no code is ever unpickled) and `meta.json` (sha256 of state.pt, phase, epoch,
backbone identity, config). Both are written to temp files, fsynced and renamed, meta last: a crash at any point
leaves either the old checkpoint or a folder whose checksum fails, never a silently wrong one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lpt_core.files import atomic_write_bytes

STATE_FILE, META_FILE = "state.pt", "meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted, unsafe, or belongs to another backbone / class count."""


@dataclass(frozen=True)
class BackboneIdentity:
    """What fixes the frozen function under the prompts: the timm name, the exact weights and the LayerNorm eps.

    norm_eps is `backbone.norm_eps` (None = timm's default): the same weights with another eps compute another
    function, so prompts trained on one are not resumed or continued on the other. A checkpoint written before
    the option existed has no entry, which reads as None, the only setting there was.
    """

    name: str
    weights_digest: str
    norm_eps: float | None = None


def save_checkpoint(directory: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(directory / STATE_FILE, data)
    meta = {**meta, "sha256": hashlib.sha256(data).hexdigest(), "format_version": FORMAT_VERSION}
    atomic_write_bytes(directory / META_FILE, json.dumps(meta, indent=1, sort_keys=True, default=str).encode())
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{directory}: not a checkpoint ({META_FILE} missing)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from err


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Returns the metadata if state.pt matches its recorded sha256; raises CheckpointError otherwise."""
    meta = read_meta(directory)
    state_path = Path(directory) / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{directory}: {STATE_FILE} missing")
    digest = hashlib.sha256(state_path.read_bytes()).hexdigest()
    if digest != meta.get("sha256"):
        raise CheckpointError(f"{state_path}: checksum mismatch (corrupted or partly written checkpoint)")
    return meta


def check_compatible(meta: dict[str, Any], backbone: BackboneIdentity | None, num_classes: int | None,
                     source: str | Path) -> None:
    if backbone is not None:
        saved = meta.get("backbone", {})
        if saved.get("name") != backbone.name or saved.get("weights_digest") != backbone.weights_digest:
            raise CheckpointError(
                f"{source}: trained on backbone {saved.get('name')!r} "
                f"(weights {str(saved.get('weights_digest'))[:12]}), "
                f"not on {backbone.name!r} (weights {backbone.weights_digest[:12]})"
            )
        if saved.get("norm_eps") != backbone.norm_eps:
            raise CheckpointError(
                f"{source}: trained with backbone.norm_eps={_eps_text(saved.get('norm_eps'))}, this run has "
                f"backbone.norm_eps={_eps_text(backbone.norm_eps)} (the LayerNorm eps changes the backbone's "
                f"function); set backbone.norm_eps={_eps_value(saved.get('norm_eps'))} to continue from it"
            )
    if num_classes is not None and meta.get("num_classes") != num_classes:
        raise CheckpointError(f"{source}: has {meta.get('num_classes')} classes, the dataset has {num_classes}")


def _eps_value(eps: float | None) -> str:
    return "null" if eps is None else repr(eps)


def _eps_text(eps: float | None) -> str:
    return "null (timm's default)" if eps is None else repr(eps)


def load_checkpoint(directory: str | Path, backbone: BackboneIdentity | None = None,
                    num_classes: int | None = None, map_location: str | torch.device = "cpu",
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) after verifying the checksum and, when given, the backbone identity and class count."""
    meta = verify_checkpoint(directory)
    check_compatible(meta, backbone, num_classes, directory)
    state = safe_torch_load(Path(directory) / STATE_FILE, map_location)
    return state, meta


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load restricted to tensors and plain containers: a pickle that carries code is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load, it contains more than tensors and plain containers "
            f"(weights_only=True); re-save it as a plain state dict or safetensors. Detail: {err}"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from err


def latest_valid_checkpoint(directories: list[Path], log=None) -> Path | None:
    """The newest (highest epoch) folder that verifies; corrupted ones are reported and skipped."""
    candidates = []
    for directory in directories:
        try:
            candidates.append((verify_checkpoint(directory).get("epoch", -1), str(directory)))
        except CheckpointError as err:
            if log is not None:
                log(f"skipping checkpoint: {err}")
    return Path(max(candidates)[1]) if candidates else None


def replace_directory(src: Path, dst: Path) -> None:
    """Moves a fully written checkpoint folder into place, replacing an older one with the same name."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def stage_of(meta: dict[str, Any]) -> str | None:
    """The stage a checkpoint's meta names; checkpoints written before the key was 'stage' call it 'phase'."""
    return meta.get("stage", meta.get("phase"))
