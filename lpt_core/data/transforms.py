"""Image transforms of the recipe (lpt-method.md): RandomResizedCrop + flip to train, Resize + CenterCrop to test."""
from __future__ import annotations

from PIL import Image
from torchvision import transforms

from lpt_core.data.base import Normalization


def to_rgb(image: Image.Image) -> Image.Image:
    # grayscale / palette / CMYK files occur in Places and iNat; the backbone wants 3 channels
    return image if image.mode == "RGB" else image.convert("RGB")


def build_transforms(img_size: int, resize_size: int, norm: Normalization, train: bool,
                     crop_min_scale: float = 0.08) -> transforms.Compose:
    """PIL image -> normalised float tensor [3, img_size, img_size].

    train: RandomResizedCrop(img_size) + RandomHorizontalFlip; test: Resize((resize_size, resize_size)) +
    CenterCrop(img_size) (recipe: 224 from 256, the square resize of the authors' code, not the short side).
    crop_min_scale: RandomResizedCrop's lower area bound (0.08, torchvision's default, for natural images).
    """
    if train:
        geometry = [transforms.RandomResizedCrop(img_size, scale=(crop_min_scale, 1.0)),
                    transforms.RandomHorizontalFlip()]
    else:
        geometry = [transforms.Resize((resize_size, resize_size)), transforms.CenterCrop(img_size)]
    return transforms.Compose([transforms.Lambda(to_rgb), *geometry, transforms.ToTensor(),
                               transforms.Normalize(norm.mean, norm.std)])
