"""Index a file-based dataset once into a Parquet manifest, validate it up front, and read images from it.

A manifest is a table (path: string relative to the image root, label: int32, split: string) with the class
counts of the training split in its metadata. It is cached under `<data.cache_dir>/manifests/<dataset>-<hash>.parquet`;
the hash covers the content (sha256) of the list / annotation files, the image root and the validation options, so
editing a list file or pointing `data.root` elsewhere builds a new one, and a second run reads the cached table
instead of parsing the lists again. Validation happens while building: a missing root, unparsable lines, labels
outside [0, C), missing or (optionally) undecodable images raise one `DatasetError` naming the dataset, the count and
the first offenders; with `data.skip_bad_images=true` bad entries are dropped and counted instead.

Options every file-based dataset reads (`data.options`):
  check_files (bool, default true)    check that every image exists (off: lists only, images checked when read)
  verify_images (bool, default false) also open every image with PIL (`Image.verify`); on with skip_bad_images
"""
from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from lpt_core.suggest import did_you_mean
from lpt_core.config import ConfigError, DataConfig
from lpt_core.data.base import DatasetBundle, Normalization
from lpt_core.data.transforms import build_transforms
from lpt_core.files import atomic_write_bytes, content_key

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1  # bump when the table layout or the validation changes
COMMON_OPTIONS: dict[str, type] = {"check_files": bool, "verify_images": bool}
_CHECK_CHUNK = 512  # paths per thread task: stat calls on a shared filesystem are slow, so they run in parallel
_CHECK_THREADS = 16


class DatasetError(ValueError):
    """The data on disk does not match what the dataset expects; the message names the dataset and the offenders."""


def check_options(cfg: DataConfig, allowed: Mapping[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """Refuses unknown or mistyped `data.options` keys of dataset `cfg.name`; returns the options."""
    for key, value in cfg.options.items():
        if key not in allowed:
            hint = did_you_mean(key, sorted(allowed), what="options")
            raise ConfigError(f"unknown option 'data.options.{key}' for dataset {cfg.name!r}; {hint}")
        declared = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        accepted = declared + (int,) if float in declared else declared  # an int is a fine float
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in declared):
            names = " or ".join(t.__name__ for t in declared)
            raise ConfigError(f"data.options.{key}={value!r} (dataset {cfg.name!r}): expected {names}")
    if cfg.options.get("verify_images") and cfg.options.get("check_files") is False:
        raise ConfigError("data.options.verify_images=true needs data.options.check_files=true")
    return dict(cfg.options)


def resolve_root(dataset: str, root: str, expected: str, must_exist: bool = True) -> Path:
    """data.root as a Path; a missing (or empty) root is an error that says what should be there."""
    if not root:
        raise DatasetError(f"{dataset}: data.root is empty; set it to the folder that holds {expected}")
    path = Path(root).expanduser()
    if must_exist and not path.is_dir():
        raise DatasetError(f"{dataset}: data.root={str(path)!r} is not a directory; it should hold {expected}")
    return path


def require_file(dataset: str, path: Path, key: str, hint: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{dataset}: {key} file not found: {path}. {hint}")
    return path


@dataclass
class Entries:
    """What a dataset's parser returns: one row per image (paths relative to the manifest's root)."""

    paths: list[str]
    labels: list[int]
    splits: list[str]
    num_classes: int
    class_names: list[str] | None = None


@dataclass
class Manifest:
    table: pa.Table  # columns path (string), label (int32), split (string)
    root: Path
    num_classes: int
    class_counts: torch.Tensor  # [C] int64, training images per class
    class_names: list[str] | None
    file: Path  # the cached Parquet file
    skipped: int = 0  # bad entries dropped under data.skip_bad_images

    def split(self, name: str) -> tuple[pa.StringArray, torch.Tensor]:
        """(paths [N], labels [N] int64) of one split, in list order."""
        rows = self.table.filter(pc.equal(self.table["split"], name))
        # an Arrow array, not a list of str: compact (one buffer), and DataLoader workers share its pages instead of
        # copying them on access as they do for the refcounted objects of a Python list
        paths = rows["path"].combine_chunks()
        return paths, torch.from_numpy(rows["label"].to_numpy().astype(np.int64))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(cfg: DataConfig, dataset: str, root: Path, sources: Mapping[str, Path],
                   parse: Callable[[], Entries], key_extra: str = "") -> Manifest:
    """The cached manifest of `dataset` if its sources are unchanged, else parse, validate, write and return it.

    sources: the files that define the index (split lists, annotation JSON), hashed by content; key_extra: anything
    else it depends on (e.g. a folder listing). `parse` runs only on a cache miss.
    """
    check_files = cfg.options.get("check_files", True)
    verify = check_files and (bool(cfg.options.get("verify_images")) or cfg.skip_bad_images)
    key = content_key({
        "version": MANIFEST_VERSION, "dataset": dataset, "root": str(root.resolve()),
        "sources": {name: sha256_file(path) for name, path in sorted(sources.items())}, "extra": key_extra,
        "check_files": check_files, "verify": verify, "skip": cfg.skip_bad_images,
    })
    file = Path(cfg.cache_dir).expanduser() / "manifests" / f"{dataset}-{key}.parquet"
    if file.is_file():
        try:
            manifest = _read(file, root)
        except (OSError, pa.ArrowException, KeyError, TypeError, ValueError) as err:
            log.warning("%s: cached manifest %s is unreadable (%s); rebuilding it", dataset, file, err)
        else:
            if manifest.skipped:
                log.warning("%s: %d bad images were skipped when %s was built (data.skip_bad_images=true)",
                            dataset, manifest.skipped, file)
            return manifest
    entries = parse()
    skipped = 0
    if check_files:
        entries, skipped = _validate_images(dataset, root, entries, verify, cfg.skip_bad_images)
    table = pa.table({"path": pa.array(entries.paths, pa.string()), "label": pa.array(entries.labels, pa.int32()),
                      "split": pa.array(entries.splits, pa.string())})
    counts = _class_counts(table, entries.num_classes)
    meta = {"dataset": dataset, "root": str(root), "num_classes": entries.num_classes,
            "class_counts": counts.tolist(), "class_names": entries.class_names,
            "skipped": skipped}
    _write_table(table.replace_schema_metadata({"lpt": json.dumps(meta)}), file)
    return _read(file, root)


def _class_counts(table: pa.Table, num_classes: int) -> torch.Tensor:
    train = table.filter(pc.equal(table["split"], "train"))["label"].to_numpy()
    return torch.from_numpy(np.bincount(train, minlength=num_classes).astype(np.int64))


def _read(file: Path, root: Path) -> Manifest:
    table = pq.read_table(file)
    meta = json.loads(table.schema.metadata[b"lpt"])
    return Manifest(table=table.replace_schema_metadata(None), root=root, num_classes=meta["num_classes"],
                    class_counts=torch.tensor(meta["class_counts"], dtype=torch.int64),
                    class_names=meta["class_names"], file=file, skipped=meta["skipped"])


def _write_table(table: pa.Table, file: Path) -> None:
    """Atomically: concurrent readers see the old file or the whole new one."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(file, sink.getvalue().to_pybytes())


def _bad_image(path: Path, verify: bool) -> str | None:
    """None if the image is fine, else the reason."""
    if not path.is_file():
        return "missing"
    if verify:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError ...)
            return f"unreadable ({type(err).__name__}: {err})"
    return None


def _validate_images(dataset: str, root: Path, entries: Entries, verify: bool,
                     skip: bool) -> tuple[Entries, int]:
    """Entries without the missing / unreadable images (and their count) under `skip`, else one DatasetError."""
    def check(chunk: list[str]) -> list[str | None]:
        return [_bad_image(root / p, verify) for p in chunk]

    chunks = [entries.paths[i:i + _CHECK_CHUNK] for i in range(0, len(entries.paths), _CHECK_CHUNK)]
    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        reasons = [r for chunk in pool.map(check, chunks) for r in chunk]
    bad = [i for i, r in enumerate(reasons) if r is not None]
    if not bad:
        return entries, 0
    missing = [entries.paths[i] for i in bad if reasons[i] == "missing"]
    unreadable = [f"{entries.paths[i]}: {reasons[i]}" for i in bad if reasons[i] != "missing"]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(entries.paths)} images are missing under {root} "
                        f"(first: {', '.join(missing[:5])})")
    if unreadable:
        problems.append(f"{len(unreadable)} images are unreadable (first: {'; '.join(unreadable[:5])})")
    if not skip:
        raise DatasetError(f"{dataset}: {'; '.join(problems)}. Fix data.root, or set data.skip_bad_images=true "
                           "to drop them, or data.options.check_files=false to skip this check")
    log.warning("%s: skipping %d bad entries: %s", dataset, len(bad), "; ".join(problems))
    drop = set(bad)
    keep = [i for i in range(len(entries.paths)) if i not in drop]
    kept = Entries(paths=[entries.paths[i] for i in keep], labels=[entries.labels[i] for i in keep],
                   splits=[entries.splits[i] for i in keep], num_classes=entries.num_classes,
                   class_names=entries.class_names)
    return kept, len(bad)


class ImageListDataset(Dataset):
    """(root / path, label) rows read lazily with PIL, converted to RGB and transformed."""

    def __init__(self, root: Path, paths: Sequence[str] | pa.StringArray, labels: torch.Tensor,
                 transform: Callable) -> None:
        self.root, self.paths, self.labels, self.transform = Path(root), paths, labels, transform

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str, transform: Callable) -> ImageListDataset:
        paths, labels = manifest.split(split)
        return cls(manifest.root, paths, labels, transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.root / str(self.paths[index])
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")  # convert() loads the pixels, so the file can be closed here
        except OSError as err:
            raise DatasetError(f"cannot read image {path}: {err}") from err
        return self.transform(rgb), int(self.labels[index])


def image_bundle(name: str, cfg: DataConfig, norm: Normalization, train: Manifest, test: Manifest,
                 test_split: str | None = None) -> DatasetBundle:
    """DatasetBundle from the "train" split of `train` and split `test_split` (default cfg.eval_split) of `test`."""
    train_tf = build_transforms(cfg.img_size, cfg.resize_size, norm, train=True, crop_min_scale=cfg.crop_min_scale)
    test_tf = build_transforms(cfg.img_size, cfg.resize_size, norm, train=False)
    train_set = ImageListDataset.from_manifest(train, "train", train_tf)
    train_eval = ImageListDataset(train.root, train_set.paths, train_set.labels, test_tf)
    return DatasetBundle(
        name=name, num_classes=train.num_classes, train=train_set,
        test=ImageListDataset.from_manifest(test, test_split or cfg.eval_split, test_tf),
        train_labels=train_set.labels, class_counts=train.class_counts,
        train_eval=train_eval, class_names=train.class_names)
