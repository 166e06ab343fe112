"""ImageNet-LT -> ImageNet-Sketch: train on ImageNet-LT, test on ImageNet-Sketch's 1000 wnid folders.

ImageNet-Sketch (https://github.com/HaohanWang/ImageNet-Sketch) is an image folder with one sub-folder per ImageNet-1k
wnid (n01440764/, ...). ImageNet-LT's labels are the sorted-wnid order of ImageNet-1k; rather than assume it, the
wnid -> label map is read off the ImageNet-LT training list (train/<wnid>/<file> <label>), so both splits agree by
construction, and a sketch folder whose wnid is not in that list is refused.

data.root: the ILSVRC-2012 images the ImageNet-LT lists point into. Options (`data.options`):
  train_list                  ImageNet-LT training list (default ImageNet_LT_train.txt in data.root)
  sketch_root                 the ImageNet-Sketch folder holding the wnid folders (required for eval_split=test)
  val_list                    with data.eval_split=val the in-domain ImageNet-LT val list is evaluated instead
  check_files, verify_images  see lpt_core.data.manifest
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from lpt_core.config import DataConfig
from lpt_core.data.base import DatasetBundle, Normalization, register_dataset
from lpt_core.data.list_file import IMAGENET_LT_LISTS, IMAGENET_ROOT, list_manifest
from lpt_core.data.manifest import (COMMON_OPTIONS, DatasetError, Entries, Manifest, build_manifest,
                                    check_options, image_bundle)

NAME = "imagenet_sketch"
WNID = re.compile(r"^n\d{8}$")


def wnid_labels(paths: np.ndarray, labels: list[int], source: Path) -> dict[str, int]:
    """wnid -> label from list paths like train/n01440764/n01440764_10026.JPEG; one label per wnid and vice versa."""
    mapping: dict[str, int] = {}
    for path, label in zip(paths, labels):
        parts = str(path).replace("\\", "/").split("/")
        wnid = parts[-2] if len(parts) >= 2 else ""
        if not WNID.match(wnid):
            raise DatasetError(f"{NAME}: {source}: cannot read a wnid from {path!r}; expected train/<wnid>/<file>, "
                               "e.g. train/n01440764/n01440764_10026.JPEG")
        if mapping.setdefault(wnid, label) != label:
            raise DatasetError(f"{NAME}: {source}: wnid {wnid} has labels {mapping[wnid]} and {label}")
    owners: dict[int, str] = {}
    for wnid, label in mapping.items():
        if owners.setdefault(label, wnid) != wnid:
            raise DatasetError(f"{NAME}: {source}: label {label} is used by wnids {owners[label]} and {wnid}")
    return mapping


def scan_image_folder(root: Path) -> dict[str, list[str]]:
    """class folder name -> image paths relative to `root` (sorted; hidden entries and non-images ignored)."""
    folders: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        files = folders.setdefault(entry.name, [])
        for dirpath, dirnames, filenames in os.walk(entry.path):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root).as_posix()
            files.extend(f"{rel}/{name}" for name in sorted(filenames) if name.lower().endswith(IMG_EXTENSIONS))
    return folders


def sketch_manifest(cfg: DataConfig, train: Manifest) -> Manifest:
    """The ImageNet-Sketch test split, labelled with `train`'s wnid -> label map."""
    given = cfg.options.get("sketch_root")
    expected = "one folder per ImageNet wnid (n01440764/, ...), as the ImageNet-Sketch release unpacks (sketch/)"
    if not given:
        raise DatasetError(f"{NAME}: data.options.sketch_root is required: the ImageNet-Sketch folder with {expected}")
    root = Path(given).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{NAME}: data.options.sketch_root={given!r} is not a directory; it should hold {expected}")
    paths, labels = train.split("train")
    mapping = wnid_labels(paths, labels.tolist(), train.file)
    folders = scan_image_folder(root)
    listing = json.dumps([folders, sorted(mapping.items())]).encode()

    def parse() -> Entries:
        unknown = [wnid for wnid in folders if wnid not in mapping]
        if unknown:
            raise DatasetError(f"{NAME}: {len(unknown)} folders under {root} are not ImageNet-LT training wnids "
                               f"(first: {', '.join(unknown[:10])}); sketch_root should hold {expected}")
        rows = [(path, mapping[wnid]) for wnid, files in folders.items() for path in files]
        if not rows:
            raise DatasetError(f"{NAME}: no images under {root}; it should hold {expected}")
        return Entries(paths=[p for p, _ in rows], labels=[label for _, label in rows], splits=["test"] * len(rows),
                       num_classes=train.num_classes)

    return build_manifest(cfg, NAME, root, {}, parse, key_extra=hashlib.sha256(listing).hexdigest())


@register_dataset(NAME)
def imagenet_sketch(cfg: DataConfig, norm: Normalization) -> DatasetBundle:
    # no test_list: the test split is the sketch folder
    check_options(cfg, {**COMMON_OPTIONS, "train_list": str, "val_list": str, "sketch_root": str})
    splits = ("train", "val") if cfg.eval_split == "val" else ("train",)
    train = list_manifest(cfg, NAME, IMAGENET_LT_LISTS, 1000, splits, IMAGENET_ROOT)
    test = train if cfg.eval_split == "val" else sketch_manifest(cfg, train)
    return image_bundle(NAME, cfg, norm, train, test)
