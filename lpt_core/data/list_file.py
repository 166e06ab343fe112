"""Datasets given by split lists of "relative/path label" lines: Places-LT, ImageNet-LT and any such split.

The Places-LT and ImageNet-LT lists are those of the OLTR release (Liu et al., CVPR 2019), linked from
https://github.com/zhmiao/OpenLongTailRecognition-OLTR. Their paths are relative to the image root `data.root`:
Places365-Standard (train/<category>/..., val/...) for Places-LT, ILSVRC-2012 (train/<wnid>/..., val/<wnid>/...) for
ImageNet-LT.

Options (`data.options`):
  train_list, val_list, test_list  list files; a relative path is taken relative to data.root. Defaults for places_lt
                                   / imagenet_lt: Places_LT_{train,val,test}.txt / ImageNet_LT_{train,val,test}.txt
                                   inside data.root; lt_list needs train_list plus the list of data.eval_split
  num_classes                      lt_list only; default: largest training label + 1
  check_files, verify_images       see lpt_core.data.manifest
Only the training list and the list of `data.eval_split` (test or val) are read.
"""
from __future__ import annotations

from pathlib import Path

from lpt_core.config import ConfigError, DataConfig
from lpt_core.data.base import DatasetBundle, Normalization, register_dataset
from lpt_core.data.manifest import (COMMON_OPTIONS, DatasetError, Entries, Manifest, build_manifest, check_options,
                                    image_bundle, require_file, resolve_root)

OLTR_URL = "https://github.com/zhmiao/OpenLongTailRecognition-OLTR"
LIST_OPTIONS: dict[str, type] = {**COMMON_OPTIONS, "train_list": str, "val_list": str, "test_list": str}
PLACES_LT_LISTS = {split: f"Places_LT_{split}.txt" for split in ("train", "val", "test")}
IMAGENET_LT_LISTS = {split: f"ImageNet_LT_{split}.txt" for split in ("train", "val", "test")}
PLACES_ROOT = "the Places365-Standard images (train/<category>/..., val/...) the Places-LT lists point to"
IMAGENET_ROOT = "the ILSVRC-2012 images (train/<wnid>/..., val/<wnid>/...) the ImageNet-LT lists point to"


def read_list(dataset: str, path: Path, num_classes: int | None) -> tuple[list[str], list[int]]:
    """(paths, labels) of a list file; a line that does not parse or a label outside [0, C) names file:line."""
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(maxsplit=1)  # the label is the last token; a path may contain spaces
            try:
                label = int(parts[1]) if len(parts) == 2 else None
            except ValueError:
                label = None
            if label is None:
                raise DatasetError(f"{dataset}: {path}:{lineno}: cannot parse {text!r}; "
                                   "expected '<relative/image/path> <integer label>'")
            if label < 0 or (num_classes is not None and label >= num_classes):
                bound = num_classes if num_classes is not None else "C"
                raise DatasetError(f"{dataset}: {path}:{lineno}: label {label} is outside [0, {bound})")
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise DatasetError(f"{dataset}: list file {path} has no entries")
    return paths, labels


def list_path(cfg: DataConfig, dataset: str, root: Path, split: str, default: str | None, hint: str) -> Path:
    key = f"{split}_list"
    given = cfg.options.get(key, default)
    if given is None:
        raise DatasetError(f"{dataset}: data.options.{key} is required (a file of 'relative/path label' lines)")
    path = Path(given).expanduser()
    return require_file(dataset, path if path.is_absolute() else root / path, f"data.options.{key}", hint)


def list_manifest(cfg: DataConfig, dataset: str, defaults: dict[str, str] | None, num_classes: int | None,
                  splits: tuple[str, ...], expected: str) -> Manifest:
    """Manifest of the `splits` lists; C = num_classes, or the largest training label + 1 when None."""
    root = resolve_root(dataset, cfg.root, expected, must_exist=cfg.options.get("check_files", True))
    if defaults:
        hint = (f"The {dataset} split lists come from the OLTR release ({OLTR_URL}); put them into data.root or "
                f"give their paths as data.options.<split>_list")
    else:
        hint = "Give a file of 'relative/path label' lines"
    lists = {split: list_path(cfg, dataset, root, split, (defaults or {}).get(split), hint) for split in splits}

    def parse() -> Entries:
        paths, labels = read_list(dataset, lists["train"], num_classes)
        classes = num_classes if num_classes is not None else max(labels) + 1
        splits_col = ["train"] * len(paths)
        for split in splits[1:]:
            more_paths, more_labels = read_list(dataset, lists[split], classes)
            paths, labels, splits_col = paths + more_paths, labels + more_labels, splits_col + [split] * len(more_paths)
        return Entries(paths=paths, labels=labels, splits=splits_col, num_classes=classes)

    return build_manifest(cfg, dataset, root, lists, parse)


def _oltr_bundle(cfg: DataConfig, norm: Normalization, name: str, defaults: dict[str, str], num_classes: int,
                 expected: str) -> DatasetBundle:
    check_options(cfg, LIST_OPTIONS)
    manifest = list_manifest(cfg, name, defaults, num_classes, ("train", cfg.eval_split), expected)
    return image_bundle(name, cfg, norm, manifest, manifest)


@register_dataset("places_lt")
def places_lt(cfg: DataConfig, norm: Normalization) -> DatasetBundle:
    """Places-LT: 365 classes, 62,500 training images (4980..5 per class), test 36,500 (100 per class)."""
    return _oltr_bundle(cfg, norm, "places_lt", PLACES_LT_LISTS, 365, PLACES_ROOT)


@register_dataset("imagenet_lt")
def imagenet_lt(cfg: DataConfig, norm: Normalization) -> DatasetBundle:
    """ImageNet-LT: 1000 classes, 115,846 training images (1280..5 per class), test 50,000 (50 per class)."""
    return _oltr_bundle(cfg, norm, "imagenet_lt", IMAGENET_LT_LISTS, 1000, IMAGENET_ROOT)


@register_dataset("lt_list")
def lt_list(cfg: DataConfig, norm: Normalization) -> DatasetBundle:
    """Any split given as list files (options train_list, test_list and/or val_list, optional num_classes)."""
    check_options(cfg, {**LIST_OPTIONS, "num_classes": int})
    num_classes = cfg.options.get("num_classes")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"data.options.num_classes={num_classes}: must be >= 1")
    manifest = list_manifest(cfg, "lt_list", None, num_classes, ("train", cfg.eval_split),
                             "the images the list paths are relative to")
    return image_bundle("lt_list", cfg, norm, manifest, manifest)
