"""What a stage's inputs need on a machine (lpt_core/inputs.py, lpt_core.backbone.weights_problem): a missing
data.root or weights file named with its key, hub weights taken from the local cache, refused when neither cached
nor downloadable. No network is used: the hub's answers are the cache folder and a patched download check."""
from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

import lpt_core.backbone as backbone
from lpt_core.backbone import weights_problem
from lpt_core.config import BackboneConfig, DataConfig, LPTConfig
from lpt_core.inputs import input_problems

TAG = "vit_tiny_patch16_224.augreg_in21k"
REPO = "timm/vit_tiny_patch16_224.augreg_in21k"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_weights(cache: Path, filename: str) -> None:
    """The layout huggingface_hub writes: refs/main names a snapshot, the file sits in it."""
    repo = cache / "models--timm--vit_tiny_patch16_224.augreg_in21k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / filename).write_bytes(b"weights")


def test_a_missing_weights_file_is_named(tmp_path):
    problem = weights_problem(BackboneConfig(name=TAG, weights_file=str(tmp_path / "absent.safetensors")))
    assert problem == f"backbone.weights_file={str(tmp_path / 'absent.safetensors')!r}: no such file"
    present = tmp_path / "vit.safetensors"
    present.write_bytes(b"x")
    assert weights_problem(BackboneConfig(name=TAG, weights_file=str(present))) is None
    assert weights_problem(BackboneConfig(name=TAG, pretrained=False)) is None  # random init needs nothing


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_hub_weights_in_the_cache_need_no_network(hub_cache, monkeypatch, filename):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    _cache_weights(hub_cache, filename)
    assert weights_problem(BackboneConfig(name=TAG)) is None


def test_hub_weights_neither_cached_nor_downloadable_are_refused(hub_cache, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert weights_problem(BackboneConfig(name=TAG)) == (
        f"backbone.name={TAG!r}: its weights (hub repo {REPO}) are not in the Hugging Face cache here ({hub_cache}) "
        f"and HF_HUB_OFFLINE is set; download them once where there is a network, or give backbone.weights_file")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def unreachable(repo: str, filename: str) -> bool:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(backbone, "file_exists", unreachable)
    assert weights_problem(BackboneConfig(name=TAG)).endswith(
        "cannot be downloaded (no route to host); download them once where there is a network, or give "
        "backbone.weights_file")
    monkeypatch.setattr(backbone, "file_exists", lambda repo, filename: filename == "model.safetensors")
    assert weights_problem(BackboneConfig(name=TAG)) is None  # reachable: the trial will download it


def test_input_problems_names_the_data_root(tmp_path):
    cfg = LPTConfig(data=DataConfig(name="places_lt", root=str(tmp_path / "places365")),
                    backbone=BackboneConfig(name=TAG, pretrained=False))
    (problem,) = input_problems(cfg)
    assert problem.startswith(f"places_lt: data.root={str(tmp_path / 'places365')!r} is not a directory")
    (tmp_path / "places365").mkdir()
    (problem,) = input_problems(cfg)
    assert "data.options.train_list file not found" in problem and "Places_LT_train.txt" in problem
