"""Import of the authors' checkpoint layout, built synthetically from a micro ViT (no download)."""
from __future__ import annotations

import copy
from functools import cache

import pytest
import timm
import torch
from safetensors.torch import save_file

from lpt_core.checkpoint import CheckpointError
from lpt_core.config import PromptConfig
from lpt_core.model import LPTModel
from lpt_core.official import load_official_into, read_official

L, P, M, K, C, D = 6, 3, 5, 3, 7, 96


class NotATensor:
    """Stands for any pickled object that torch.load(weights_only=True) must refuse."""


def micro_vit(num_classes: int = 0):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32,
                             patch_size=4, embed_dim=D, depth=L, num_heads=3).eval()


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """The authors' layout: backbone under "image_encoder." (its own head included), prompt learner, head [D, C]."""
    gen = torch.Generator().manual_seed(1)
    vit = micro_vit(num_classes=10)  # its classifier head must be dropped on import
    state = {f"image_encoder.{k}": v.clone() for k, v in vit.state_dict().items()}
    state.update({
        "prompt_learner.Prompt_Tokens": torch.randn(L, P, D, generator=gen),
        "prompt_learner.Prompt_Tokens_pool": torch.randn(M, L - K, P, D, generator=gen),
        "prompt_learner.Prompt_Keys": torch.randn(M, D, generator=gen),
        "prompt_learner.head.weight": torch.randn(D, C, generator=gen),
        "prompt_learner.extra_scale": torch.ones(1),
    })
    return state


@cache
def target_vit():
    """Another random ViT of the same shape (built once; timm's constructor dominates the test time)."""
    torch.manual_seed(2)
    return micro_vit()


def make_model(pool_size: int = M, num_classes: int = C, block_k: int = K, length: int = P) -> LPTModel:
    cfg = PromptConfig(length=length, pool_size=pool_size, block_k=block_k)
    return LPTModel(copy.deepcopy(target_vit()), num_classes, cfg).eval()


def assert_loaded(model: LPTModel, source: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, source[f"image_encoder.{name}"]), name
    assert torch.equal(model.shared_prompt.tokens, source["prompt_learner.Prompt_Tokens"])
    assert torch.equal(model.group_pool.prompts, source["prompt_learner.Prompt_Tokens_pool"])
    assert torch.equal(model.group_pool.keys, source["prompt_learner.Prompt_Keys"])
    assert torch.equal(model.head.weight, source["prompt_learner.head.weight"].t())


@pytest.mark.parametrize("layout", ["plain", "module", "nested"])
def test_every_layout_loads_every_tensor(tmp_path, source, layout):
    saved = {
        "plain": source,
        "module": {f"module.{k}": v for k, v in source.items()},
        "nested": {"state_dict": source, "epoch": 89, "best_acc": 50.07},
    }[layout]
    torch.save(saved, tmp_path / "lpt.pth")
    ckpt = read_official(tmp_path / "lpt.pth")
    assert ckpt.prompt_overrides == {"length": P, "pool_size": M, "block_k": K}
    assert (ckpt.num_classes, ckpt.depth, ckpt.dim) == (C, L, D)
    assert "prompt_learner.extra_scale" in ckpt.ignored_keys
    assert {"image_encoder.head.weight", "image_encoder.head.bias"} <= set(ckpt.ignored_keys)
    model = make_model()
    assert not torch.equal(model.backbone.cls_token, source["image_encoder.cls_token"])  # really replaced
    load_official_into(model, ckpt)
    assert_loaded(model, source)


def test_phase2_logits_match_a_model_set_directly(tmp_path, source):
    torch.save(source, tmp_path / "lpt.pth")
    model = make_model()
    load_official_into(model, read_official(tmp_path / "lpt.pth"))
    direct = make_model()
    direct.backbone.load_state_dict({k: source[f"image_encoder.{k}"] for k in direct.backbone.state_dict()})
    with torch.no_grad():
        direct.shared_prompt.tokens.copy_(source["prompt_learner.Prompt_Tokens"])
        direct.group_pool.prompts.copy_(source["prompt_learner.Prompt_Tokens_pool"])
        direct.group_pool.keys.copy_(source["prompt_learner.Prompt_Keys"])
        direct.head.weight.copy_(source["prompt_learner.head.weight"].t())
        images = torch.randn(4, 3, 32, 32)
        assert torch.equal(model(images, "phase2").logits, direct(images, "phase2").logits)


def test_safetensors_variant_loads(tmp_path, source):
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "lpt.safetensors"))
    model = make_model()
    load_official_into(model, read_official(tmp_path / "lpt.safetensors"))
    assert_loaded(model, source)


def test_pickled_objects_are_refused(tmp_path, source):
    torch.save({**source, "args": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        read_official(tmp_path / "evil.pth")


@pytest.mark.parametrize("kwargs, key, hint", [
    ({"pool_size": 4}, "group_pool", "prompt.pool_size=5"),
    ({"num_classes": 8}, "head.weight", "7 classes"),
    ({"block_k": 2}, "block_k", "prompt.block_k=3"),
    ({"length": 4}, "shared_prompt.tokens", "prompt.length=3"),
])
def test_model_mismatch_names_the_key_and_the_override(tmp_path, source, kwargs, key, hint):
    torch.save(source, tmp_path / "lpt.pth")
    ckpt = read_official(tmp_path / "lpt.pth")
    with pytest.raises(CheckpointError, match=key) as err:
        load_official_into(make_model(**kwargs), ckpt)
    assert hint in str(err.value)


@pytest.mark.parametrize("key, shape", [
    ("prompt_learner.Prompt_Tokens", (L - 1, P, D)),  # L must equal the backbone's depth
    ("prompt_learner.Prompt_Tokens_pool", (M, L + 1, P, D)),  # L-K > L means K < 0
    ("prompt_learner.Prompt_Keys", (M + 1, D)),
    ("prompt_learner.head.weight", (D + 1, C)),
])
def test_inconsistent_checkpoint_names_the_key_and_shapes(tmp_path, source, key, shape):
    torch.save({**source, key: torch.zeros(shape)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=key) as err:
        read_official(tmp_path / "bad.pth")
    assert str(list(shape)) in str(err.value)


def test_missing_backbone_is_refused(tmp_path, source):
    torch.save({k: v for k, v in source.items() if k.startswith("prompt_learner.")}, tmp_path / "prompts.pth")
    with pytest.raises(CheckpointError, match="no ViT backbone"):
        read_official(tmp_path / "prompts.pth")


def test_backbone_of_another_depth_is_named(tmp_path, source):
    torch.save(source, tmp_path / "lpt.pth")
    deeper = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                               embed_dim=D, depth=L + 2, num_heads=3)
    model = LPTModel(deeper, C, PromptConfig(length=P, pool_size=M, block_k=K))
    with pytest.raises(CheckpointError, match=f"backbone: model has depth {L + 2}, width {D}; checkpoint depth {L}"):
        load_official_into(model, read_official(tmp_path / "lpt.pth"))
