"""Pretrains the demo's micro ViT on the demo's balanced source domain, so that the demo's frozen backbone is real.

`ensure_demo_backbone` returns `<cache_dir>/demo_backbone/<hash>/micro_vit.safetensors`, training it first when no
earlier call did; the hash names the architecture, the source split and this config, and a file lock keeps
parallel trials from training the same backbone twice. The file holds the ViT without its source classifier and
loads through the normal path: `create_backbone(BackboneConfig(name, model_kwargs=..., weights_file=path))`.

    lpt-pretrain-demo [--cache-dir outputs/cache] [--epochs N]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable

import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save

from experiments.compose import CONF_DIR
from experiments.schema import DemoPretrainConfig
from lpt_core.backbone import set_norm_eps
from lpt_core.config import BackboneConfig, DataConfig, LPTConfig, build_dataclass
from lpt_core.cost import timed
from lpt_core.data.synthetic import NUM_SOURCE_CLASSES, DemoOptions, demo_source_split, source_digest
from lpt_core.files import atomic_write_bytes, content_key, file_lock
from lpt_core.runtime import torch_threads
from lpt_core.schedule import lr_at
from lpt_core.step import update

WEIGHTS_NAME = "micro_vit.safetensors"
# the demo's micro ViT as its config group declares it (model=micro), for this module's command line
DEMO_BACKBONE = build_dataclass(
    BackboneConfig, OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "micro.yaml").backbone), "backbone")


def backbone_hash(backbone: BackboneConfig, data: DataConfig, pretrain: DemoPretrainConfig) -> str:
    key = {"name": backbone.name, "model_kwargs": backbone.model_kwargs, "source": source_digest(data),
           "pretrain": dataclasses.asdict(pretrain)}
    if backbone.norm_eps is not None:  # timm's default keeps the names of the backbones cached before the key
        key["norm_eps"] = backbone.norm_eps
    return content_key(key)


def demo_backbone_path(backbone: BackboneConfig, data: DataConfig, pretrain: DemoPretrainConfig,
                       cache_dir: str | Path) -> Path:
    """Where the pretrained micro ViT's weights are cached (whether or not they are trained yet)."""
    return Path(cache_dir) / "demo_backbone" / backbone_hash(backbone, data, pretrain) / WEIGHTS_NAME


def ensure_demo_backbone(backbone: BackboneConfig, data: DataConfig, pretrain: DemoPretrainConfig,
                         cache_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Path of the pretrained micro ViT's weights, training and caching them unless a previous call did."""
    weights = demo_backbone_path(backbone, data, pretrain, cache_dir)
    if weights.is_file():
        return weights
    folder = weights.parent
    waiting = f"waiting for another process to finish pretraining the backbone in {folder}"
    with file_lock(folder / ".lock", on_wait=lambda holder: log(waiting)):  # then it finds the weights trained
        if not weights.is_file():
            _pretrain_and_save(backbone, data, pretrain, folder, log)
    return weights


def _pretrain_and_save(backbone: BackboneConfig, data: DataConfig, pretrain: DemoPretrainConfig, folder: Path,
                       log: Callable[[str], None]) -> None:
    start = time.time()
    images, labels, num_classes = demo_source_split(data, "train")
    test_images, test_labels, _ = demo_source_split(data, "test")
    log(f"pretraining {backbone.name} {backbone.model_kwargs} on {len(labels)} source images, {num_classes} classes")
    model = pretrain_micro_vit(backbone, images, labels, num_classes, pretrain, log)
    accuracy = evaluate(model, test_images, test_labels)
    wall = time.time() - start
    log(f"source test accuracy {accuracy:.3f} (chance {1 / num_classes:.3f}), {wall:.0f} s")
    record = {"backbone": dataclasses.asdict(backbone), "data_options": data.options,
              "pretrain": dataclasses.asdict(pretrain), "source_classes": num_classes,
              "source_train_images": len(labels), "source_test_accuracy": accuracy, "wall_time_s": wall}
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    atomic_write_bytes(folder / "pretrain.json", json.dumps(record, indent=2).encode())
    atomic_write_bytes(folder / WEIGHTS_NAME, save(state))


def _to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] normalised with mean = std = 0.5 (the AugReg ViTs' statistics)."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _augment(x: torch.Tensor, cfg: DemoPretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (area in [crop_min_scale, 1], aspect in [3/4, 4/3]) and mirror, as one affine warp."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(cfg.crop_min_scale, 1.0, generator=generator)
    aspect = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator).exp()
    sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    tx = (1 - sx) * torch.empty(n).uniform_(-1, 1, generator=generator)
    ty = (1 - sy) * torch.empty(n).uniform_(-1, 1, generator=generator)
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)  # [N, 2, 3]: output grid -> input coordinates
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * mirror, tx, sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def pretrain_micro_vit(backbone: BackboneConfig, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       cfg: DemoPretrainConfig, log: Callable[[str], None] = print) -> torch.nn.Module:
    """Trains timm's ViT from scratch with a source classifier: AdamW, warm-up + cosine, label smoothing."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = timm.create_model(backbone.name, pretrained=False, num_classes=num_classes, **backbone.model_kwargs)
    if backbone.norm_eps is not None:  # pretrained with the eps LPT will run it with
        set_norm_eps(model, backbone.norm_eps)
    # weight decay on matrices only: not on biases, norms, the class token or the position embedding
    decays = {n: p.ndim > 1 and "pos_embed" not in n and "token" not in n for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in model.named_parameters() if decays[n]], "weight_decay": cfg.weight_decay},
         {"params": [p for n, p in model.named_parameters() if not decays[n]], "weight_decay": 0.0}], lr=cfg.lr)
    x_all = _to_input(images)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    step, start = 0, time.time()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        seen = correct = loss_sum = 0.0
        for batch in order.split(cfg.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, cfg.lr)
            x, y = _augment(x_all[batch], cfg, generator), labels[batch]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss_sum / seen:.3f}  train acc {correct / seen:.3f}  "
            f"{time.time() - start:.0f} s")
    return model.eval()


def pretrain_seconds(backbone: BackboneConfig, data: DataConfig, pretrain: DemoPretrainConfig,
                     batch: int = 16) -> float:
    """What pretraining one micro ViT takes here (on the CPU, where the demo pretrains): its epochs over the source
    images (source_per_class x NUM_SOURCE_CLASSES) at the measured time per image of a training step."""
    options = DemoOptions.from_config(data)
    model = timm.create_model(backbone.name, pretrained=False, num_classes=NUM_SOURCE_CLASSES, **backbone.model_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pretrain.lr)
    x = torch.randn(batch, 3, options.image_size, options.image_size)
    y = torch.randint(NUM_SOURCE_CLASSES, (batch,))
    per_image = timed(lambda: update(optimizer, F.cross_entropy(model(x), y)), 2, torch.device("cpu")) / batch
    return per_image * pretrain.epochs * options.source_per_class * NUM_SOURCE_CLASSES


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = sum((model(_to_input(images[i:i + batch_size])).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(labels), batch_size))
    return correct / max(1, len(labels))



def with_demo_weights(cfg: LPTConfig, pretrain: DemoPretrainConfig | None) -> LPTConfig:
    """The demo's config pointing at the micro ViT the project pretrains itself (cached by content hash; trained by
    `ensure_demo_weights`); a real backbone, or weights a user named, are left as they are. Cheap: a sweep sets
    every trial's weights file (and so its stage keys) before anything is trained."""
    if pretrain is None or cfg.backbone.weights_file is not None:
        return cfg
    path = demo_backbone_path(cfg.backbone, cfg.data, pretrain, cfg.data.cache_dir)
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, weights_file=str(path)))


def pretrained_here(cfg: LPTConfig, pretrain: DemoPretrainConfig | None) -> bool:
    """Whether cfg's backbone is a demo micro ViT that this project pretrains (set by `with_demo_weights`), not
    weights a user named."""
    weights = cfg.backbone.weights_file
    if pretrain is None or weights is None or Path(weights).parents[1] != Path(cfg.data.cache_dir) / "demo_backbone":
        return False
    return weights == str(demo_backbone_path(cfg.backbone, cfg.data, pretrain, cfg.data.cache_dir))


def ensure_demo_weights(configs: Iterable[LPTConfig], pretrain: DemoPretrainConfig | None,
                        log: Callable[[str], None] = print) -> None:
    """Pretrains, once each, the demo backbones that these configs (set by `with_demo_weights`) load and that no
    earlier call cached; each with the torch threads its config asks for (`threads`), as its trials train."""
    for cfg in configs:
        if pretrained_here(cfg, pretrain):
            with torch_threads(cfg.threads):
                ensure_demo_backbone(cfg.backbone, cfg.data, pretrain, cfg.data.cache_dir, log=log)


def resolve_backbone(cfg: LPTConfig, pretrain: DemoPretrainConfig | None, log: Callable[[str], None] = print
                     ) -> LPTConfig:
    """One config with its demo backbone set and trained (a single run, a benchmark)."""
    cfg = with_demo_weights(cfg, pretrain)
    ensure_demo_weights([cfg], pretrain, log)
    return cfg


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default="outputs/cache")
    parser.add_argument("--epochs", type=int, default=DemoPretrainConfig.epochs)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = DataConfig(name="demo", cache_dir=args.cache_dir)
    weights = ensure_demo_backbone(DEMO_BACKBONE, data, DemoPretrainConfig(epochs=args.epochs), args.cache_dir)
    record = json.loads((weights.parent / "pretrain.json").read_text())
    print(f"source test accuracy {record['source_test_accuracy']:.3f} "
          f"({record['source_classes']} classes, trained in {record['wall_time_s']:.0f} s)")
    print(f"weights: {weights}")
    return weights


def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
