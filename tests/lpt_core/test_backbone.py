"""create_backbone: local weights load bit-identically, names and files are validated, the result is frozen."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from lpt_core.backbone import create_backbone, norm_eps_values, normalization, weights_digest
from lpt_core.config import BackboneConfig, ConfigError, from_dict

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


def _layer_norm_names(model: nn.Module) -> dict[str, float]:
    return {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}


def test_norm_eps_reaches_every_layernorm(micro_vit_file: Path) -> None:
    default = create_backbone(_cfg(micro_vit_file))
    authors = create_backbone(_cfg(micro_vit_file, norm_eps=1e-5))
    expected_names = {"norm"} | {f"blocks.{i}.{n}" for i in range(KWARGS["depth"]) for n in ("norm1", "norm2")}
    assert set(_layer_norm_names(authors)) == expected_names  # block norms and the final norm, nothing missed
    assert norm_eps_values(default) == {1e-6} and norm_eps_values(authors) == {1e-5}
    assert weights_digest(authors) == weights_digest(default)  # eps is not a weight: same file, same digest


def test_norm_eps_computes_what_a_timm_model_built_with_that_eps_computes(micro_vit_file: Path) -> None:
    """Setting eps after construction must equal building with norm_layer=nn.LayerNorm(eps) (the authors' way)."""
    ours = create_backbone(_cfg(micro_vit_file, norm_eps=1e-5))
    built = timm.create_model(NAME, pretrained=False, num_classes=0, norm_layer=partial(nn.LayerNorm, eps=1e-5),
                              **KWARGS).eval()
    built.load_state_dict(load_file(str(micro_vit_file)))
    default = create_backbone(_cfg(micro_vit_file))
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = built.forward_features(images)
        assert torch.equal(ours.forward_features(images), expected)
        assert not torch.allclose(default.forward_features(images), expected, rtol=0, atol=1e-5)


def test_norm_eps_without_layernorm_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"backbone.norm_eps=1e-05: 'vit_tiny_patch16_224' has no LayerNorm"):
        create_backbone(BackboneConfig(name=NAME, pretrained=False, norm_eps=1e-5,
                                       model_kwargs={**KWARGS, "norm_layer": "rmsnorm"}))


@pytest.mark.parametrize("value", [0, -1e-5, float("inf"), float("nan")])
def test_norm_eps_must_be_positive_and_finite(value: float) -> None:
    with pytest.raises(ConfigError, match=r"backbone.norm_eps=.*must be a finite number > 0"):
        from_dict({"backbone": {"norm_eps": value}})


def test_norm_eps_accepts_null_and_numbers() -> None:
    assert from_dict({}).backbone.norm_eps is None  # timm's own default
    assert from_dict({"backbone": {"norm_eps": 1e-5}}).backbone.norm_eps == 1e-5
    with pytest.raises(ConfigError, match=r"backbone.norm_eps: expected float"):
        from_dict({"backbone": {"norm_eps": "1e-5"}})
