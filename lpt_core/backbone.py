"""The frozen timm Vision Transformer under the prompts.

Weights are described by data, as timm does: a hub tag (`vit_base_patch16_224.augreg_in21k`) or a local file
passed to timm's own loader through `pretrained_cfg_overlay`, so the demo's self-pretrained micro ViT and the
real AugReg checkpoints take the same path.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
from huggingface_hub import constants as hf_constants, file_exists, try_to_load_from_cache
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lpt_core.suggest import did_you_mean
from lpt_core.config import BackboneConfig, ConfigError

LOCAL_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def _pretrained_kwargs(cfg: BackboneConfig) -> dict:
    if cfg.weights_file is None:
        return {"pretrained": cfg.pretrained}
    path = Path(cfg.weights_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"backbone.weights_file={cfg.weights_file!r}: no such file")
    if not path.name.endswith(LOCAL_WEIGHT_SUFFIXES):
        raise ConfigError(f"backbone.weights_file={cfg.weights_file!r}: expected one of {LOCAL_WEIGHT_SUFFIXES}")
    # .npz holds the original JAX/big_vision layout, which timm converts in its custom loader
    overlay = {"file": str(path), "custom_load": path.suffix == ".npz"}
    return {"pretrained": True, "pretrained_cfg_overlay": overlay}


def create_backbone(cfg: BackboneConfig) -> VisionTransformer:
    """Creates the ViT without its classifier, frozen and in eval mode (dropout/drop-path off for good)."""
    base_name = cfg.name.split(".")[0]
    if not timm.is_model(base_name):
        hint = did_you_mean(base_name, timm.list_models("vit_*"), what="timm ViTs")
        raise ConfigError(f"backbone.name={cfg.name!r}: unknown timm model; {hint}")
    model = timm.create_model(cfg.name, num_classes=0, **_pretrained_kwargs(cfg), **cfg.model_kwargs)
    if not isinstance(model, VisionTransformer) or model.cls_token is None:
        raise ConfigError(f"backbone.name={cfg.name!r}: LPT needs a timm VisionTransformer with a class token")
    if model.num_prefix_tokens != 1 or model.global_pool != "token":
        raise ConfigError(f"backbone.name={cfg.name!r}: register tokens / non-token pooling are not supported")
    if cfg.norm_eps is not None and not set_norm_eps(model, cfg.norm_eps):
        raise ConfigError(f"backbone.norm_eps={cfg.norm_eps!r}: {cfg.name!r} has no LayerNorm to apply it to")
    model.requires_grad_(False)
    return model.eval()


HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm loads from a hub repo, in that order


def weights_problem(cfg: BackboneConfig, timeout_s: float = 10.0) -> str | None:
    """Why the backbone's weights cannot be had on this machine, or None: a local file that is missing, or a hub
    tag that is neither in the Hugging Face cache nor downloadable (offline, or the hub unreachable). Checked
    before a sweep trains anything, on every node, so that a trial does not die on a hub error."""
    if cfg.weights_file is not None:
        try:
            _pretrained_kwargs(cfg)
        except ConfigError as err:
            return str(err)
        return None
    if not cfg.pretrained:
        return None
    base_name = cfg.name.split(".")[0]
    if not timm.is_model(base_name):
        return f"backbone.name={cfg.name!r}: unknown timm model"
    repo = timm.models.get_pretrained_cfg(cfg.name).hf_hub_id
    if repo is None:  # weights behind a plain URL: torch.hub's cache, not checked here
        return None
    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in HUB_WEIGHT_FILES):
        return None
    where = f"not in the Hugging Face cache here ({hf_constants.HF_HUB_CACHE})"
    if hf_constants.HF_HUB_OFFLINE:
        return (f"backbone.name={cfg.name!r}: its weights (hub repo {repo}) are {where} and HF_HUB_OFFLINE is set; "
                f"download them once where there is a network, or give backbone.weights_file")
    try:
        if any(file_exists(repo, name) for name in HUB_WEIGHT_FILES):
            return None
        reason = "the repo has no weights file"
    except Exception as err:  # no network, a proxy, the hub down: all say the same to the user
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
    return (f"backbone.name={cfg.name!r}: its weights (hub repo {repo}) are {where} and cannot be downloaded "
            f"({reason}); download them once where there is a network, or give backbone.weights_file")


def set_norm_eps(model: nn.Module, eps: float) -> list[str]:
    """Sets `eps` on every LayerNorm of `model`; returns their names (empty: the model has none).

    Setting the attribute after construction equals building the model with `norm_layer=LayerNorm(eps=eps)`:
    torch's and timm's LayerNorm both pass `self.eps` to the kernel at every call, and eps is not a weight, so
    the loaded weights (and their digest) stay as they are.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)]
    for name in names:
        model.get_submodule(name).eps = eps
    return names


def norm_eps_values(model: nn.Module) -> set[float]:
    """The distinct eps of `model`'s LayerNorms (one value for a ViT built by create_backbone)."""
    return {module.eps for module in model.modules() if isinstance(module, nn.LayerNorm)}


def normalization(model: VisionTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std from the weights' pretrained config (0.5 / 0.5 for the AugReg in21k models)."""
    pcfg = model.pretrained_cfg or {}
    return tuple(pcfg.get("mean", (0.5, 0.5, 0.5))), tuple(pcfg.get("std", (0.5, 0.5, 0.5)))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the backbone tensors: identifies the exact weights a checkpoint was trained on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
