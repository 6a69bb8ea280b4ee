"""Two-view augmentations of SimCLR and MoCo v2, as presets of the data pipeline's TRANSFORMS.

Each maps a decoded PIL image to ``{"view1", "view2"}``: two independent draws of random
resized crop (area ``data.crop_scale``: SimCLR 0.08-1, MoCo v2 0.2-1), flip, colour jitter
(p = 0.8, strength ``data.jitter_strength``), grayscale (p = 0.2) and Gaussian blur
(p = 0.5), resized and normalised per the model's data contract. They run in the data
pipeline's worker processes like every other augmentation, from its per-sample seed.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from train.config import DataConfig
from train.contract import DataContract
from train.data import TRANSFORMS, interpolation_mode

# Colour jitter (brightness, contrast, saturation, hue) at strength 1. SimCLR scales
# (0.8, 0.8, 0.8, 0.2) by its strength s; MoCo v2 uses (0.4, 0.4, 0.4, 0.1), i.e. s = 0.5.
JITTER = {"simclr": (0.8, 0.8, 0.8, 0.2), "moco_v2": (0.4, 0.4, 0.4, 0.1)}


def augmentation(jitter: tuple[float, ...], crop_scale: tuple[float, float], contract: DataContract) -> v2.Compose:
    """One view's random augmentation, ending in the contract's size and normalisation."""
    size = contract.image_size
    blur_kernel = max(3, size // 10) | 1  # SimCLR: 10% of the image side, odd
    brightness, contrast, saturation, hue = jitter
    return v2.Compose([
        v2.PILToTensor(),
        v2.RGB(),  # greyscale sources (Fashion-MNIST) become 3-channel first
        v2.RandomResizedCrop(size, scale=crop_scale, interpolation=interpolation_mode(contract), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, min(hue, 0.5))], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(contract.mean, contract.std),
    ])


def two_views(preset: str) -> Callable[[DataConfig, DataContract], Callable[[Image.Image], dict]]:
    """The TRANSFORMS builder of a preset: ``(data config, contract) -> image -> two views``."""

    def build(cfg: DataConfig, contract: DataContract) -> Callable[[Image.Image], dict]:
        jitter = tuple(cfg.jitter_strength * j for j in JITTER[preset])
        augment = augmentation(jitter, cfg.crop_scale, contract)
        return lambda image: {"view1": augment(image), "view2": augment(image)}  # (3, H, W) each

    return build


for _preset in JITTER:
    TRANSFORMS.register(_preset, two_views(_preset))
