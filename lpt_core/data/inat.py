"""iNaturalist 2018 (8142 classes, 437,513 training images) from the official competition JSON files.

Files from https://github.com/visipedia/inat_comp/tree/master/2018: data.root holds train2018.json, val2018.json and
the image folder train_val2018/ their "file_name" entries point into. Labels are the "category_id"s (0..8141).
val2018.json is the held-out split the long-tail literature reports as "test"; it serves data.eval_split=test and
=val alike, since the 2018 release has no other labelled held-out set.

Options (`data.options`):
  train_json, test_json          the JSON files (relative to data.root); defaults train2018.json, val2018.json
  check_files, verify_images     see lpt_core.data.manifest
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lpt_core.config import DataConfig
from lpt_core.data.base import DatasetBundle, Normalization, register_dataset
from lpt_core.data.manifest import (COMMON_OPTIONS, DatasetError, Entries, build_manifest, check_options,
                                    image_bundle, require_file, resolve_root)

INAT_URL = "https://github.com/visipedia/inat_comp/tree/master/2018"
DEFAULT_JSON = {"train": "train2018.json", "test": "val2018.json"}


def _load(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise DatasetError(f"inat18: {path} is not valid JSON ({err})") from err
    missing = [key for key in keys if not isinstance(data, dict) or not isinstance(data.get(key), list)]
    if missing:
        raise DatasetError(f"inat18: {path} has no list {missing}; expected the official iNaturalist 2018 layout "
                           f"with keys {list(keys)}")
    return data


def class_names(data: dict[str, Any], path: Path) -> list[str]:
    """Class names indexed by category_id; the ids must be exactly 0..C-1."""
    categories = data["categories"]
    names: dict[int, str] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or cat["id"] in names:
            raise DatasetError(f"inat18: {path}: categories[{i}] = {cat!r} needs a unique integer 'id'")
        names[cat["id"]] = str(cat.get("name", cat["id"]))
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"inat18: {path}: category ids are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def image_labels(data: dict[str, Any], path: Path, num_classes: int) -> tuple[list[str], list[int]]:
    """(file_name, category_id) of every image; each image needs one annotation with a category in [0, C)."""
    label_of: dict[Any, int] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("category_id"), int):
            raise DatasetError(f"inat18: {path}: annotations[{i}] = {ann!r} needs 'image_id' and 'category_id'")
        if not 0 <= ann["category_id"] < num_classes:
            raise DatasetError(f"inat18: {path}: annotations[{i}]: category_id {ann['category_id']} is outside "
                               f"[0, {num_classes})")
        label_of[ann["image_id"]] = ann["category_id"]
    paths, labels = [], []
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise DatasetError(f"inat18: {path}: images[{i}] = {image!r} needs 'id' and 'file_name'")
        if image["id"] not in label_of:
            raise DatasetError(f"inat18: {path}: images[{i}] (id {image['id']}) has no annotation")
        paths.append(image["file_name"])
        labels.append(label_of[image["id"]])
    if not paths:
        raise DatasetError(f"inat18: {path} lists no images")
    return paths, labels


@register_dataset("inat18")
def inat18(cfg: DataConfig, norm: Normalization) -> DatasetBundle:
    check_options(cfg, {**COMMON_OPTIONS, "train_json": str, "test_json": str})
    root = resolve_root("inat18", cfg.root, "train2018.json, val2018.json and the train_val2018/ image folder",
                        must_exist=cfg.options.get("check_files", True))
    files = {split: require_file("inat18", root / Path(cfg.options.get(f"{split}_json", name)).expanduser(),
                                 f"data.options.{split}_json", f"Download it from {INAT_URL}")
             for split, name in DEFAULT_JSON.items()}

    def parse() -> Entries:
        train = _load(files["train"], ("images", "annotations", "categories"))
        names = class_names(train, files["train"])
        train_paths, train_labels = image_labels(train, files["train"], len(names))
        del train  # the official train JSON is ~150 MB of Python objects
        test_paths, test_labels = image_labels(_load(files["test"], ("images", "annotations")), files["test"],
                                               len(names))
        return Entries(paths=train_paths + test_paths, labels=train_labels + test_labels,
                       splits=["train"] * len(train_paths) + ["test"] * len(test_paths),
                       num_classes=len(names), class_names=names)

    manifest = build_manifest(cfg, "inat18", root, files, parse)
    return image_bundle("inat18", cfg, norm, manifest, manifest, test_split="test")
