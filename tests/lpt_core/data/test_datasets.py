"""File-based dataset adapters on miniature copies of the real on-disk formats, built in tmp_path."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lpt_core.config import ConfigError, DataConfig
from lpt_core.data import DATASETS, Normalization, build_dataset
from lpt_core.data import cifar_lt, list_file
from lpt_core.data.manifest import DatasetError, ImageListDataset
from lpt_core.data.transforms import build_transforms

IMG = 32  # small crops keep the tests fast; the recipe uses 224 from 256


def _jpeg_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()


def write_images(root: Path, paths: list[str], data: bytes = JPEG) -> None:
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)


def write_list(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p} {label}\n" for p, label in rows))
    return path


def data_cfg(tmp_path: Path, name: str, root: Path | str, **kwargs) -> DataConfig:
    return DataConfig(name=name, root=str(root), img_size=IMG, resize_size=IMG + 4,
                      cache_dir=str(tmp_path / "cache"), **kwargs)


def wnid(c: int) -> str:
    return f"n{1440764 + 37 * c:08d}"  # sorted like the real ImageNet-1k wnids


def oltr_root(root: Path, prefix: str, num_classes: int, train_per_class: list[int], folder=wnid) -> Path:
    """Places-LT / ImageNet-LT layout: list files + JPEGs under root, train/<class folder>/..., val/<...>/..."""
    train = [(f"train/{folder(c)}/{i}.jpg", c) for c in range(num_classes) for i in range(train_per_class[c])]
    test = [(f"val/{folder(c)}/t.jpg", c) for c in range(num_classes)]
    val = [(f"train/{folder(c)}/0.jpg", c) for c in range(num_classes)]
    write_images(root, [p for p, _ in train + test])
    for split, rows in (("train", train), ("test", test), ("val", val)):
        write_list(root / f"{prefix}_{split}.txt", rows)
    return root


@pytest.fixture
def small_list(tmp_path: Path) -> Path:
    """Generic lt_list data: 3 classes with 4 / 2 / 1 training images and one test image each."""
    root = tmp_path / "small"
    train = [(f"train/a/{i}.jpg", 0) for i in range(4)] + [("train/b/0.jpg", 1), ("train/b/1.jpg", 1),
                                                          ("train/c/0.jpg", 2)]
    test = [(f"test/{c}.jpg", c) for c in range(3)]
    write_images(root, [p for p, _ in train + test])
    write_list(root / "train.txt", train)
    write_list(root / "test.txt", test)
    return root


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet-LT layout with 1000 wnid classes, 2 training images of class 0 and 1 of every other."""
    return oltr_root(tmp_path_factory.mktemp("imagenet"), "ImageNet_LT", 1000, [2] + [1] * 999)


def small_cfg(tmp_path: Path, root: Path, **options) -> DataConfig:
    return data_cfg(tmp_path, "lt_list", root, options={"train_list": "train.txt", "test_list": "test.txt", **options})


def test_registered_names() -> None:
    assert {"places_lt", "imagenet_lt", "lt_list", "inat18", "cifar100_lt", "imagenet_sketch"} <= set(DATASETS)


def test_transforms_shapes_rgb_and_normalisation() -> None:
    norm = Normalization()
    gray = Image.new("L", (50, 40), 255)
    for train in (True, False):
        out = build_transforms(IMG, IMG + 4, norm, train=train)(gray)
        assert out.shape == (3, IMG, IMG)
        assert torch.allclose(out, torch.ones_like(out))  # (1 - 0.5) / 0.5


def test_places_lt_bundle(tmp_path: Path) -> None:
    counts = [3, 2] + [1] * 363
    root = oltr_root(tmp_path / "places", "Places_LT", 365, counts, folder=lambda c: f"place{c}")
    bundle = build_dataset(data_cfg(tmp_path, "places_lt", root))
    assert bundle.num_classes == 365
    assert bundle.class_counts.tolist() == counts
    assert len(bundle.train) == len(bundle.train_labels) == sum(counts) == len(bundle.train_eval)
    assert len(bundle.test) == 365
    image, label = bundle.train[3]
    assert image.shape == (3, IMG, IMG) and label == 1
    image, label = bundle.test[7]
    assert image.shape == (3, IMG, IMG) and label == 7
    val = build_dataset(data_cfg(tmp_path, "places_lt", root, eval_split="val"))
    assert isinstance(val.test, ImageListDataset) and str(val.test.paths[0]).startswith("train/")


def test_imagenet_lt_list_outside_root(tmp_path: Path, imagenet_root: Path) -> None:
    assert len(build_dataset(data_cfg(tmp_path, "imagenet_lt", imagenet_root)).train) == 1001
    elsewhere = tmp_path / "lists" / "my_train.txt"  # the default list without class 0's second image
    lines = (imagenet_root / "ImageNet_LT_train.txt").read_text().splitlines()
    write_list(elsewhere, [tuple(line.rsplit(" ", 1)) for line in lines[1:]])
    bundle = build_dataset(data_cfg(tmp_path, "imagenet_lt", imagenet_root, options={"train_list": str(elsewhere)}))
    assert bundle.num_classes == 1000 and len(bundle.train) == 1000 and len(bundle.test) == 1000


def test_lt_list_infers_classes_and_loads(tmp_path: Path, small_list: Path) -> None:
    bundle = build_dataset(small_cfg(tmp_path, small_list))
    assert bundle.num_classes == 3
    assert bundle.class_counts.tolist() == [4, 2, 1]
    assert bundle.train_labels.dtype == torch.int64
    image, label = bundle.train_eval[6]
    assert image.shape == (3, IMG, IMG) and label == 2


def test_manifest_is_cached_and_rebuilt_when_a_list_changes(tmp_path: Path, small_list: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = []
    original = list_file.read_list
    monkeypatch.setattr(list_file, "read_list", lambda *args: parsed.append(args[1]) or original(*args))
    cfg = small_cfg(tmp_path, small_list)
    build_dataset(cfg)
    assert len(parsed) == 2
    build_dataset(cfg)
    assert len(parsed) == 2  # second build: cached manifest, lists not parsed
    files = list((tmp_path / "cache" / "manifests").iterdir())
    assert len(files) == 1 and files[0].name.startswith("lt_list-") and files[0].suffix == ".parquet"
    table = pq.read_table(files[0])
    assert table.column_names == ["path", "label", "split"]
    assert str(table.schema.field("label").type) == "int32"
    assert set(table["split"].to_pylist()) == {"train", "test"}

    with open(small_list / "train.txt", "a") as f:
        f.write("train/c/0.jpg 2\n")
    bundle = build_dataset(cfg)
    assert len(parsed) == 4 and bundle.class_counts.tolist() == [4, 2, 2]
    assert len(list((tmp_path / "cache" / "manifests").iterdir())) == 2  # and no temp file left behind


def test_manifest_name_keeps_its_value(tmp_path: Path, small_list: Path) -> None:
    """Manifests cached by earlier versions are found again: the key is the formula they were named with."""
    build_dataset(small_cfg(tmp_path, small_list))
    sources = {split: hashlib.sha256((small_list / f"{split}.txt").read_bytes()).hexdigest()
               for split in ("test", "train")}
    key = hashlib.sha256(json.dumps({
        "version": 1, "dataset": "lt_list", "root": str(small_list.resolve()), "sources": sources, "extra": "",
        "check_files": True, "verify": False, "skip": False}, sort_keys=True).encode()).hexdigest()[:16]
    assert [f.name for f in (tmp_path / "cache" / "manifests").iterdir()] == [f"lt_list-{key}.parquet"]


def test_corrupt_cached_manifest_is_rebuilt(tmp_path: Path, small_list: Path, caplog) -> None:
    cfg = small_cfg(tmp_path, small_list)
    build_dataset(cfg)
    (file,) = (tmp_path / "cache" / "manifests").iterdir()
    file.write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING):
        assert len(build_dataset(cfg).train) == 7
    assert "unreadable" in caplog.text


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"places_lt: data.root=.*nowhere.* is not a directory.*Places365"):
        build_dataset(data_cfg(tmp_path, "places_lt", tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="data.root is empty"):
        build_dataset(data_cfg(tmp_path, "inat18", ""))


def test_missing_list_file_points_to_oltr(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"imagenet_lt: data.options.train_list file not found: .*ImageNet_LT_train"
                                           r".txt.*OpenLongTailRecognition-OLTR"):
        build_dataset(data_cfg(tmp_path, "imagenet_lt", tmp_path / "empty"))


def test_lt_list_needs_the_eval_split_list(tmp_path: Path, small_list: Path) -> None:
    cfg = small_cfg(tmp_path, small_list)
    cfg.eval_split = "val"
    with pytest.raises(DatasetError, match="data.options.val_list is required"):
        build_dataset(cfg)


@pytest.mark.parametrize("bad", ["test/0.jpg zero", "test/0.jpg", "test/0.jpg --1"])
def test_bad_line_names_file_and_line(tmp_path: Path, small_list: Path, bad: str) -> None:
    with open(small_list / "test.txt", "a") as f:
        f.write(f"\n{bad}\n")  # after a blank line: line 5
    with pytest.raises(DatasetError, match=rf"test.txt:5: cannot parse '{bad}'"):
        build_dataset(small_cfg(tmp_path, small_list))


@pytest.mark.parametrize(("list_name", "line", "options", "bound"), [
    ("train.txt", "train/a/0.jpg 3", {"num_classes": 3}, "3"),  # above the declared C
    ("test.txt", "test/0.jpg 3", {}, "3"),  # above the C inferred from the training list
    ("train.txt", "train/a/0.jpg -1", {}, "C"),
])
def test_label_out_of_range(tmp_path: Path, small_list: Path, list_name: str, line: str, options: dict,
                            bound: str) -> None:
    lines = (small_list / list_name).read_text().splitlines()
    write_list(small_list / list_name, [tuple(row.rsplit(" ", 1)) for row in lines[:1] + [line] + lines[1:]])
    with pytest.raises(DatasetError, match=rf"{list_name}:2: label -?\d is outside \[0, {bound}\)"):
        build_dataset(small_cfg(tmp_path, small_list, **options))


def test_missing_images_one_error_with_count_and_first_offenders(tmp_path: Path, small_list: Path) -> None:
    rows = [(f"gone/{i}.jpg", 0) for i in range(7)]
    write_list(small_list / "train.txt", rows + [("train/b/0.jpg", 1), ("train/c/0.jpg", 2)])
    with pytest.raises(DatasetError) as err:
        build_dataset(small_cfg(tmp_path, small_list))
    message = str(err.value)
    assert message.startswith("lt_list: 7 of 12 images are missing")
    assert "gone/0.jpg, gone/1.jpg, gone/2.jpg, gone/3.jpg, gone/4.jpg)" in message and "gone/5.jpg" not in message
    assert "skip_bad_images" in message


def test_skip_bad_images_drops_missing_and_unreadable(tmp_path: Path, small_list: Path, caplog) -> None:
    (small_list / "train/a/1.jpg").write_bytes(b"this is no image")
    (small_list / "train/a/2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of 10 images are missing.*1 images are unreadable .*train/a/1.jpg"):
        build_dataset(small_cfg(tmp_path, small_list, verify_images=True))
    cfg = small_cfg(tmp_path, small_list)
    cfg.skip_bad_images = True
    with caplog.at_level(logging.WARNING):
        bundle = build_dataset(cfg)
    assert bundle.class_counts.tolist() == [2, 2, 1]
    assert "skipping 2 bad entries" in caplog.text


def test_unreadable_image_without_verification_fails_on_read(tmp_path: Path, small_list: Path) -> None:
    (small_list / "train/a/0.jpg").write_bytes(b"this is no image")
    bundle = build_dataset(small_cfg(tmp_path, small_list))  # verify_images is off by default
    with pytest.raises(DatasetError, match=r"cannot read image .*train/a/0.jpg"):
        bundle.train[0]


def test_check_files_off_skips_the_image_check(tmp_path: Path, small_list: Path) -> None:
    (small_list / "train/a/0.jpg").unlink()
    assert len(build_dataset(small_cfg(tmp_path, small_list, check_files=False)).train) == 7


def test_options_are_checked(tmp_path: Path, small_list: Path) -> None:
    with pytest.raises(ConfigError, match="unknown option 'data.options.train_lst'.*did you mean 'train_list'"):
        build_dataset(small_cfg(tmp_path, small_list, train_lst="x"))
    with pytest.raises(ConfigError, match=r"data.options.check_files='no'.*expected bool"):
        build_dataset(small_cfg(tmp_path, small_list, check_files="no"))


def test_places_lt_real_split_lists(tmp_path: Path, shared_data: Path) -> None:
    root = shared_data / "places_lt"
    bundle = build_dataset(data_cfg(tmp_path, "places_lt", root, options={"check_files": False}))
    assert bundle.num_classes == 365
    assert int(bundle.class_counts.sum()) == len(bundle.train) == 62_500
    assert int(bundle.class_counts.max()) == 4980 and int(bundle.class_counts.min()) == 5
    assert len(bundle.test) == 36_500


# ---- iNaturalist 2018 ---------------------------------------------------------------------------------------------

def write_inat(root: Path, train_per_class: list[int]) -> Path:
    categories = [{"id": c, "name": f"species {c}"} for c in range(len(train_per_class))]
    for split, per_class in (("train", train_per_class), ("val", [1] * len(train_per_class))):
        images, annotations = [], []
        for c, n in enumerate(per_class):
            for i in range(n):
                image_id = len(images) + (0 if split == "train" else 10_000)
                images.append({"id": image_id, "file_name": f"train_val2018/Plantae/{c}/{split}{i}.jpg"})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": c})
        write_images(root, [image["file_name"] for image in images])
        doc = {"images": images, "annotations": annotations, "categories": categories}
        (root / f"{split}2018.json").write_text(json.dumps(doc))
    return root


def test_inat18_bundle(tmp_path: Path) -> None:
    root = write_inat(tmp_path / "inat", [3, 2, 1, 1])
    for split in ("test", "val"):  # val2018 is the held-out split either way
        bundle = build_dataset(data_cfg(tmp_path, "inat18", root, eval_split=split))
        assert bundle.num_classes == 4 and bundle.class_counts.tolist() == [3, 2, 1, 1]
        assert bundle.class_names == [f"species {c}" for c in range(4)]
        assert len(bundle.test) == 4
        image, label = bundle.test[2]
        assert image.shape == (3, IMG, IMG) and label == 2


def test_inat18_errors(tmp_path: Path) -> None:
    root = write_inat(tmp_path / "inat", [1, 1])
    doc = json.loads((root / "train2018.json").read_text())
    doc["annotations"][1]["category_id"] = 2
    (root / "train2018.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"train2018.json: annotations\[1\]: category_id 2 is outside \[0, 2\)"):
        build_dataset(data_cfg(tmp_path, "inat18", root))
    doc["annotations"] = doc["annotations"][:1]
    (root / "train2018.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"images\[1\] \(id 1\) has no annotation"):
        build_dataset(data_cfg(tmp_path, "inat18", root))
    (root / "val2018.json").unlink()
    with pytest.raises(DatasetError, match=r"test_json file not found: .*val2018.json.*inat_comp"):
        build_dataset(data_cfg(tmp_path, "inat18", root))


# ---- CIFAR-100-LT -------------------------------------------------------------------------------------------------

def write_cifar(root: Path, per_class: int, test_per_class: int = 1) -> Path:
    """The python-version layout: pickled dicts with bytes keys, data uint8 [N, 3072] (RGB planes)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", per_class), ("test", test_per_class)):
        labels = [c for c in range(100) for _ in range(n)]
        data = np.zeros((len(labels), 3072), dtype=np.uint8)
        data[:, :1024] = np.asarray(labels, dtype=np.uint8)[:, None]  # red plane = label, to check alignment
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"filenames": [b"x.png"] * len(labels)}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{c}".encode() for c in range(100)]}, f, protocol=2)
    return root


@pytest.fixture(scope="module")
def cifar_full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A stand-in for CIFAR-100's training set: 500 images (32x32) per class, 50,000 in all (150 MB, removed after)."""
    root = write_cifar(tmp_path_factory.mktemp("cifar_full"), per_class=500)
    yield root
    shutil.rmtree(root)


@pytest.mark.parametrize(("tau", "total"), [(10, 19_573), (50, 12_608), (100, 10_847), (200, 9_502)])
def test_cifar100_lt_profile(tmp_path: Path, cifar_full: Path, tau: int, total: int) -> None:
    bundle = build_dataset(data_cfg(tmp_path, "cifar100_lt", cifar_full, options={"tau": tau}))
    expected = [math.floor(500 * (1 / tau) ** (c / 99)) for c in range(100)]
    assert bundle.class_counts.tolist() == expected
    assert torch.bincount(bundle.train_labels, minlength=100).tolist() == expected
    assert len(bundle.train) == total and expected[0] == 500 and expected[-1] == 500 // tau
    assert len(bundle.test) == 100


def test_cifar100_lt_small_bundle(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "cifar", per_class=20, test_per_class=2)
    cfg = data_cfg(tmp_path, "cifar100_lt", root, options={"tau": 10, "seed": 3})
    bundle = build_dataset(cfg)
    assert bundle.num_classes == 100 and bundle.class_counts[0] == 20 and bundle.class_counts[-1] == 2
    assert len(bundle.test) == 200 and bundle.class_names[5] == "class5"
    image, label = bundle.train_eval[25]
    assert image.shape == (3, IMG, IMG) and label == 1
    assert bundle.train.images[25, 0, 0, 0] == 1  # pixels stay aligned with their labels
    assert torch.equal(build_dataset(cfg).train_labels, bundle.train_labels)


def test_cifar_selection_is_seeded() -> None:
    labels = torch.arange(10).repeat_interleave(50)
    counts = cifar_lt.long_tail_counts(10, 50, 10)
    a, b = (cifar_lt.long_tail_indices(labels, counts, seed) for seed in (0, 0))
    c = cifar_lt.long_tail_indices(labels, counts, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(labels[a]).tolist() == counts


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"cifar-100-python.*lacks \['train', 'test', 'meta'\].*"
                                           r"cifar-100-python/\{train,test,meta\}.*data.download=true"):
        build_dataset(data_cfg(tmp_path, "cifar100_lt", tmp_path))


def test_cifar_download_uses_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_cifar100(root: str, train: bool, download: bool) -> None:
        calls.append((root, download))
        write_cifar(Path(root), per_class=5)

    monkeypatch.setattr("torchvision.datasets.CIFAR100", fake_cifar100)
    bundle = build_dataset(data_cfg(tmp_path, "cifar100_lt", tmp_path / "dl", download=True, options={"tau": 5}))
    assert calls == [(str(tmp_path / "dl"), True)] and bundle.class_counts[-1] == 1


def test_cifar_bad_options(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "cifar", per_class=5)
    with pytest.raises(ConfigError, match="data.options.tau=0.0"):
        build_dataset(data_cfg(tmp_path, "cifar100_lt", root, options={"tau": 0}))
    with pytest.raises(ConfigError, match=r"data.options.tau=10.0: leaves class 99 without images"):
        build_dataset(data_cfg(tmp_path, "cifar100_lt", root, options={"tau": 10}))
    with pytest.raises(ConfigError, match="only the test split"):
        build_dataset(data_cfg(tmp_path, "cifar100_lt", root, eval_split="val"))


# ---- ImageNet-LT -> ImageNet-Sketch -------------------------------------------------------------------------------

def sketch_layout(tmp_path: Path, root: Path, folders: list[str]) -> DataConfig:
    sketch = tmp_path / "sketch"
    write_images(sketch, [f"{folder}/sketch_{i}.JPEG" for folder in folders for i in range(2)],
                 _jpeg_bytes((0, 0, 0), (60, 80)))
    (sketch / folders[0] / "notes.txt").write_text("not an image")
    return data_cfg(tmp_path, "imagenet_sketch", root, options={"sketch_root": str(sketch)})


def test_imagenet_sketch_bundle(tmp_path: Path, imagenet_root: Path) -> None:
    cfg = sketch_layout(tmp_path, imagenet_root, [wnid(7), wnid(999), wnid(0)])
    bundle = build_dataset(cfg)
    assert bundle.num_classes == 1000 and len(bundle.train) == 1001 and bundle.class_counts[0] == 2
    assert len(bundle.test) == 6
    assert sorted(set(bundle.test.labels.tolist())) == [0, 7, 999]
    for i in range(len(bundle.test)):
        folder = str(bundle.test.paths[i]).split("/")[0]
        assert int(bundle.test.labels[i]) == [0, 7, 999][[wnid(0), wnid(7), wnid(999)].index(folder)]
    image, label = bundle.test[0]
    assert image.shape == (3, IMG, IMG) and label == 0


def test_imagenet_sketch_refuses_unknown_wnids(tmp_path: Path, imagenet_root: Path) -> None:
    cfg = sketch_layout(tmp_path, imagenet_root, [wnid(3), "n99999999", "sketch"])
    with pytest.raises(DatasetError, match=r"2 folders under .*sketch are not ImageNet-LT training wnids "
                                           r"\(first: n99999999, sketch\)"):
        build_dataset(cfg)


def test_imagenet_sketch_needs_sketch_root(tmp_path: Path, imagenet_root: Path) -> None:
    cfg = sketch_layout(tmp_path, imagenet_root, [wnid(3)])
    cfg.options = {}
    with pytest.raises(DatasetError, match="data.options.sketch_root is required"):
        build_dataset(cfg)


def test_imagenet_sketch_eval_split_val_is_in_domain(tmp_path: Path, imagenet_root: Path) -> None:
    cfg = sketch_layout(tmp_path, imagenet_root, [wnid(3)])
    cfg.eval_split = "val"
    bundle = build_dataset(cfg)
    assert len(bundle.test) == 1000 and str(bundle.test.paths[0]).startswith("train/")
