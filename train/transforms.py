"""Image transforms by name (``data.transform``): decoded PIL image -> the model's input tensors.

Each entry of :data:`TRANSFORMS` is a builder ``(data config, contract) -> image -> dict``:

- ``clip_train``: random resized crop (area ``data.crop_scale``) -> ``{"image"}``.
- ``eval``: resize and centre crop -> ``{"image"}`` (evaluation and curation scoring).
- ``simclr``, ``moco_v2``: two views -> ``{"view1", "view2"}``: independent draws of random
  resized crop (SimCLR 0.08-1, MoCo v2 0.2-1), flip, colour jitter (p = 0.8, strength
  ``data.jitter_strength``), grayscale (p = 0.2) and Gaussian blur (p = 0.5).

All end in the size and normalisation of the model's data contract. They run in the data
pipeline's worker processes, from its per-sample seed.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop as RandomResizedCropParams
from torchvision.transforms import v2 as T

from pipeline.core.registry import Registry
from train.config import DataConfig
from train.contract import DataContract

TRANSFORMS: Registry = Registry("transform")
Transform = Callable[[Image.Image], dict]


def _normalize(contract: DataContract) -> list:
    return [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(contract.mean, contract.std)]


def interpolation_mode(contract: DataContract) -> T.InterpolationMode:
    return T.InterpolationMode(contract.interpolation)


class RandomResizedCrop:
    """torchvision's RandomResizedCrop as one PIL resize from a source box (no cropped copy)."""

    def __init__(self, size: int, scale: tuple[float, float], interpolation: str):
        self.size, self.scale = size, scale
        self.resample = getattr(Image.Resampling, interpolation.upper())

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, height, width = RandomResizedCropParams.get_params(image, list(self.scale), [3 / 4, 4 / 3])
        box = (left, top, left + width, top + height)
        return image.resize((self.size, self.size), self.resample, box=box)


@TRANSFORMS.register("clip_train")
def clip_train(cfg: DataConfig, contract: DataContract) -> Transform:
    crop = RandomResizedCrop(contract.image_size, cfg.crop_scale, contract.interpolation)
    transform = T.Compose([crop, *_normalize(contract)])
    return lambda image: {"image": transform(image)}


@TRANSFORMS.register("eval")
def eval_transform(cfg: DataConfig | None, contract: DataContract) -> Transform:
    resize = T.Resize(contract.image_size, interpolation=interpolation_mode(contract))
    transform = T.Compose([resize, T.CenterCrop(contract.image_size), *_normalize(contract)])
    return lambda image: {"image": transform(image.convert("RGB"))}


# ---------------------------------------------------------------------------- two views (SimCLR, MoCo v2)

# Colour jitter (brightness, contrast, saturation, hue) at strength 1. SimCLR scales
# (0.8, 0.8, 0.8, 0.2) by its strength s; MoCo v2 uses (0.4, 0.4, 0.4, 0.1), i.e. s = 0.5.
JITTER = {"simclr": (0.8, 0.8, 0.8, 0.2), "moco_v2": (0.4, 0.4, 0.4, 0.1)}


def augmentation(jitter: tuple[float, ...], crop_scale: tuple[float, float], contract: DataContract) -> T.Compose:
    """One view's random augmentation, ending in the contract's size and normalisation."""
    size = contract.image_size
    blur_kernel = max(3, size // 10) | 1  # SimCLR: 10% of the image side, odd
    brightness, contrast, saturation, hue = jitter
    return T.Compose([
        T.PILToTensor(),
        T.RGB(),  # greyscale sources (Fashion-MNIST) become 3-channel first
        T.RandomResizedCrop(size, scale=crop_scale, interpolation=interpolation_mode(contract), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(brightness, contrast, saturation, min(hue, 0.5))], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(contract.mean, contract.std),
    ])


def two_views(preset: str) -> Callable[[DataConfig, DataContract], Transform]:
    """The TRANSFORMS builder of a preset: ``(data config, contract) -> image -> two views``."""

    def build(cfg: DataConfig, contract: DataContract) -> Transform:
        jitter = tuple(cfg.jitter_strength * j for j in JITTER[preset])
        augment = augmentation(jitter, cfg.crop_scale, contract)
        return lambda image: {"view1": augment(image), "view2": augment(image)}  # (3, H, W) each

    return build


for _preset in JITTER:
    TRANSFORMS.register(_preset, two_views(_preset))
