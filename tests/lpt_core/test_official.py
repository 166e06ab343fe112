"""Import of the authors' checkpoint layout, built synthetically from a micro ViT (no download), checked against a
literal re-implementation of the paper's computation."""
from __future__ import annotations

import copy
import logging
from functools import cache
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lpt_core.backbone import create_backbone, norm_eps_values, set_norm_eps
from lpt_core.checkpoint import CheckpointError
from lpt_core.config import BackboneConfig, PromptConfig
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
    set_norm_eps(direct.backbone, 1e-5)  # the authors' eps, which the import sets too
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


# ---- the authors' function, written out literally from the paper and lpt-method.md ---------------------------------
# The tiny ViT of issue 11: image 32, patch 8, width 64, 4 blocks, 2 heads; P = 3, m = 5, k = 2, K = 2, 11 classes.
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
TP, TM, TK, TBLOCK_K, TC = 3, 5, 2, 2, 11


def tiny_release(seed: int = 3) -> dict[str, Tensor]:
    """A random LPT in the authors' checkpoint layout: the ViT under "image_encoder.", the prompt learner's tensors.

    timm's init leaves every LayerNorm at weight 1 / bias 0 and the class token near 0; they are drawn at random
    here so that no norm is an identity that a wrong import could get right by accident. The token scale stays
    timm's (small, like a real ViT's early blocks), where the LayerNorm eps matters.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY)
    state = {}
    for name, tensor in vit.state_dict().items():
        if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            tensor = 1 + 0.2 * torch.randn(tensor.shape, generator=gen)
        elif name.endswith(("norm1.bias", "norm2.bias")) or name == "norm.bias":
            tensor = 0.2 * torch.randn(tensor.shape, generator=gen)
        elif name == "cls_token":
            tensor = 0.02 * torch.randn(tensor.shape, generator=gen)
        state[f"image_encoder.{name}"] = tensor.clone()
    depth, dim = TINY["depth"], TINY["embed_dim"]
    state.update({
        "prompt_learner.Prompt_Tokens": 0.5 * torch.randn(depth, TP, dim, generator=gen),  # u: [L, P, D]
        "prompt_learner.Prompt_Tokens_pool": 0.5 * torch.randn(TM, depth - TBLOCK_K, TP, dim, generator=gen),
        "prompt_learner.Prompt_Keys": torch.randn(TM, dim, generator=gen),  # [m, D]
        "prompt_learner.head.weight": torch.randn(dim, TC, generator=gen),  # [D, C]
    })
    return state


def authors_vit(release: dict[str, Tensor]) -> VisionTransformer:
    """timm's ViT the way the authors build it: torch's nn.LayerNorm (eps 1e-5) as every norm layer."""
    vit = VisionTransformer(num_classes=0, norm_layer=nn.LayerNorm, **TINY)
    prefix = "image_encoder."
    vit.load_state_dict({k[len(prefix):]: v for k, v in release.items() if k.startswith(prefix)})
    return vit.eval()


def prompted_cls_feature(vit: VisionTransformer, images: Tensor, prompts_of_block) -> Tensor:
    """Class token + position embedding; in every block the block's prompts are appended to the tokens, the timm
    block runs whole on the longer sequence and the prompt outputs are dropped; final norm; class token."""
    x = vit.patch_embed(images)  # [B, N, D]
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], dim=1) + vit.pos_embed  # [B, 1 + N, D]
    tokens = x.shape[1]
    for i, block in enumerate(vit.blocks):
        x = block(torch.cat([x, prompts_of_block(i)], dim=1))[:, :tokens]
    return vit.norm(x)[:, 0]  # [B, D]


@torch.no_grad()
def authors_logits(release: dict[str, Tensor], images: Tensor) -> tuple[Tensor, Tensor]:
    """(cosine logits [B, C], top-k prompt ids [B, k]) of LPT phase 2 as the paper describes it.

    Query = the phase-1 feature (shared prompt u_i in every block); cosine match against the keys; the top-k group
    prompts averaged (mean ensemble); a second pass with u_i in blocks 1..K and [u_i, r_{i-K}] in blocks K+1..L;
    cosine classifier on the final class token.
    """
    vit, batch = authors_vit(release), len(images)
    u = release["prompt_learner.Prompt_Tokens"]
    pool, keys = release["prompt_learner.Prompt_Tokens_pool"], release["prompt_learner.Prompt_Keys"]
    head = release["prompt_learner.head.weight"]  # [D, C]
    query = prompted_cls_feature(vit, images, lambda i: u[i].expand(batch, -1, -1))
    similarity = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).t()  # [B, m]
    chosen = similarity.topk(TK, dim=-1).indices  # [B, k]
    r = pool[chosen].mean(dim=1)  # [B, L-K, P, D]

    def phase2_prompts(i: int) -> Tensor:
        shared = u[i].expand(batch, -1, -1)
        return shared if i < TBLOCK_K else torch.cat([shared, r[:, i - TBLOCK_K]], dim=1)

    feature = prompted_cls_feature(vit, images, phase2_prompts)
    return F.normalize(feature, dim=-1) @ F.normalize(head, dim=0), chosen


def imported(path: Path, norm_eps: float | None = None) -> LPTModel:
    """The public path: create_backbone -> LPTModel -> read_official -> load_official_into."""
    backbone = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, model_kwargs=dict(TINY),
                                              norm_eps=norm_eps))
    model = LPTModel(backbone, TC, PromptConfig(length=TP, pool_size=TM, top_k=TK, block_k=TBLOCK_K)).eval()
    load_official_into(model, read_official(path))
    return model


@pytest.fixture(scope="module")
def release_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("release") / "places_lt_lpt.pth"
    torch.save(tiny_release(), path)
    return path


@pytest.mark.parametrize("built_with", [None, 1e-5])
def test_import_computes_the_authors_function(release_file, built_with, caplog):
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    expected, expected_topk = authors_logits(torch.load(release_file), images)
    with caplog.at_level(logging.INFO, logger="lpt_core.official"):
        model = imported(release_file, norm_eps=built_with)
    assert norm_eps_values(model.backbone) == {1e-5}
    announced = [r.getMessage() for r in caplog.records if "LayerNorm eps" in r.getMessage()]
    # a model built with timm's 1e-6 is corrected and says so; one built with the authors' eps needs nothing
    assert announced == ([] if built_with == 1e-5 else
                         ["set LayerNorm eps [1e-06] -> 1e-05 on the backbone's 9 norms: the authors' model uses "
                          "torch's default (backbone.norm_eps=1e-05 builds it so)"])
    with torch.no_grad():
        out = model(images, "phase2")
    assert torch.equal(out.topk_idx.sort(dim=-1).values, expected_topk.sort(dim=-1).values)
    assert (out.logits - expected).abs().max().item() <= 1e-5


def test_timm_default_eps_is_another_function(release_file):
    """What the import computed before it set the eps: the reference tells the two apart by far more than 1e-5."""
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    expected, _ = authors_logits(torch.load(release_file), images)
    model = imported(release_file)
    set_norm_eps(model.backbone, 1e-6)
    with torch.no_grad():
        assert (model(images, "phase2").logits - expected).abs().max().item() > 1e-4


def test_a_backbone_without_layernorm_is_refused(release_file):
    backbone = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", pretrained=False,
                                              model_kwargs={**TINY, "norm_layer": "rmsnorm"}))
    model = LPTModel(backbone, TC, PromptConfig(length=TP, pool_size=TM, top_k=TK, block_k=TBLOCK_K))
    with pytest.raises(CheckpointError, match=r"LayerNorm .*RmsNorm.*backbone.norm_eps=1e-05"):
        load_official_into(model, read_official(release_file))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere\.pth: no such file"):
        read_official(tmp_path / "nowhere.pth")
