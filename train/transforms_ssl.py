"""Two-view augmentations of SimCLR and MoCo v2, as presets of the data pipeline's TRANSFORMS.

Each maps a decoded PIL image to ``{"view1", "view2"}``: two independent draws of random
resized crop, flip, colour jitter (p = 0.8), grayscale (p = 0.2) and Gaussian blur
(p = 0.5), resized and normalised per the model's data contract. They run in the data
pipeline's worker processes like every other augmentation.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from train.contract import DataContract


@dataclasses.dataclass(kw_only=True, frozen=True)
class Augmentation:
    crop_scale: tuple[float, float]  # RandomResizedCrop area range
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue at strength 1
    blur_p: float = 0.5


# SimCLR: jitter strength s scales (0.8, 0.8, 0.8, 0.2); MoCo v2's (0.4, 0.4, 0.4, 0.1) is s = 0.5.
PRESETS = {
    "simclr": Augmentation(crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2)),
    "moco_v2": Augmentation(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1)),
}


def augmentation(preset: Augmentation, contract: DataContract, strength: float = 1.0) -> v2.Compose:
    """One view's random augmentation, ending in the contract's size and normalisation."""
    size = contract.image_size
    blur_kernel = max(3, size // 10) | 1  # SimCLR: 10% of the image side, odd
    brightness, contrast, saturation, hue = (strength * j for j in preset.jitter)
    return v2.Compose([
        v2.PILToTensor(),
        v2.RGB(),  # greyscale sources (Fashion-MNIST) become 3-channel first
        v2.RandomResizedCrop(size, scale=preset.crop_scale, interpolation=_interpolation(contract), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, min(hue, 0.5))], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=preset.blur_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(contract.mean, contract.std),
    ])


def two_views(preset: Augmentation, contract: DataContract, strength: float = 1.0) -> Callable[[Image.Image], dict]:
    augment = augmentation(preset, contract, strength)

    def transform(image: Image.Image) -> dict[str, torch.Tensor]:
        return {"view1": augment(image), "view2": augment(image)}  # (3, H, W) each

    return transform


def _interpolation(contract: DataContract) -> v2.InterpolationMode:
    return v2.InterpolationMode(contract.interpolation)
