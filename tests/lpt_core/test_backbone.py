"""create_backbone: local weights load bit-identically, names and files are validated, the result is frozen."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from lpt_core.backbone import create_backbone, normalization, weights_digest
from lpt_core.config import BackboneConfig, ConfigError

NAME = "vit_tiny_patch16_224"
KWARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)


def _cfg(weights_file: Path | str | None = None, **kw) -> BackboneConfig:
    return BackboneConfig(name=NAME, weights_file=None if weights_file is None else str(weights_file),
                          model_kwargs=dict(KWARGS), **kw)


def _assert_same_weights(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(source)
    for name, tensor in source.items():
        assert torch.equal(state[name], tensor), name


def test_loads_local_safetensors_bit_identically(micro_vit_file: Path) -> None:
    model = create_backbone(_cfg(micro_vit_file))
    _assert_same_weights(model, load_file(str(micro_vit_file)))


def test_loads_local_pth_bit_identically(micro_vit_file: Path, tmp_path: Path) -> None:
    source = load_file(str(micro_vit_file))
    pth = tmp_path / "micro_vit.pth"
    torch.save(source, pth)
    model = create_backbone(_cfg(pth))
    _assert_same_weights(model, source)
    # both files describe the same weights: same digest
    assert weights_digest(model) == weights_digest(create_backbone(_cfg(micro_vit_file)))


def test_loaded_weights_differ_from_a_fresh_init(micro_vit_file: Path) -> None:
    torch.manual_seed(99)
    fresh = create_backbone(_cfg(pretrained=False))
    loaded = create_backbone(_cfg(micro_vit_file))
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, loaded.blocks[0].attn.qkv.weight)


def test_frozen_and_in_eval_mode(micro_vit_file: Path) -> None:
    model = create_backbone(_cfg(micro_vit_file))
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training and not any(m.training for m in model.modules())
    assert model.num_classes == 0  # no classifier: LPT brings its own cosine head
    assert len(model.blocks) == KWARGS["depth"] and model.embed_dim == KWARGS["embed_dim"]


def test_unknown_name_lists_close_names() -> None:
    with pytest.raises(ConfigError) as err:
        create_backbone(BackboneConfig(name="vit_tiny_patch16_22", pretrained=False))
    message = str(err.value)
    assert message.startswith("backbone.name='vit_tiny_patch16_22'")
    assert "vit_tiny_patch16_224" in message


def test_unknown_name_with_tag_is_checked_on_the_architecture() -> None:
    with pytest.raises(ConfigError, match="backbone.name='vit_bsae_patch16_224.augreg_in21k'.*vit_base_patch16_224"):
        create_backbone(BackboneConfig(name="vit_bsae_patch16_224.augreg_in21k", pretrained=False))


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match=r"backbone\.weights_file=.*nope\.safetensors.*no such file"):
        create_backbone(_cfg(missing))


def test_weights_file_with_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_text("x")
    with pytest.raises(ConfigError, match=r"backbone\.weights_file=.*expected one of"):
        create_backbone(_cfg(path))


def test_non_vit_is_refused() -> None:
    with pytest.raises(ConfigError, match="VisionTransformer"):
        create_backbone(BackboneConfig(name="resnet18", pretrained=False))


def test_pooling_other_than_cls_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="register tokens / non-token pooling"):
        create_backbone(BackboneConfig(name=NAME, pretrained=False, model_kwargs={**KWARGS, "global_pool": "avg"}))


def test_weights_digest_changes_with_any_weight(micro_vit_file: Path) -> None:
    model = create_backbone(_cfg(micro_vit_file))
    digest = weights_digest(model)
    assert len(digest) == 64 and digest == weights_digest(model)
    assert digest == weights_digest(create_backbone(_cfg(micro_vit_file)))  # deterministic across loads
    with torch.no_grad():
        model.blocks[2].mlp.fc1.weight[0, 0] += 1e-3
    changed = weights_digest(model)
    assert changed != digest
    with torch.no_grad():
        model.blocks[2].mlp.fc1.weight[0, 0] -= 1e-3
        model.norm.bias[5] = model.norm.bias[5] + 1.0
    assert weights_digest(model) not in (digest, changed)


def test_normalization_reads_the_pretrained_config() -> None:
    model = timm.create_model(NAME, pretrained=False, num_classes=0, **KWARGS)
    mean, std = normalization(model)
    assert mean == tuple(model.pretrained_cfg["mean"]) and std == tuple(model.pretrained_cfg["std"])
    model.pretrained_cfg = {}
    assert normalization(model) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
