"""Image transforms by name (``data.transform``): decoded PIL image -> the model's input tensors.

Each entry of :data:`TRANSFORMS` is a builder ``(data config, contract) -> image -> dict``:

- ``clip_train``: random resized crop (area ``data.crop_scale``), optionally (``data.hflip``,
  ``data.randaugment_ops``) a horizontal flip and RandAugment of ALBEF's ops -> ``{"image"}``.
- ``eval``: resize and centre crop -> ``{"image"}`` (evaluation and curation scoring).
- ``simclr``, ``moco_v2``: two views -> ``{"view1", "view2"}``: independent draws of random
  resized crop (SimCLR 0.08-1, MoCo v2 0.2-1), flip, colour jitter (p = 0.8, strength
  ``data.jitter_strength``), grayscale (p = 0.2) and Gaussian blur (p = 0.5).
- ``cpc``: random resized crop and flip of the image, cut into the contract's patch grid
  (:meth:`DataContract.cut_patches`), then CPC v2's patch-level augmentation, drawn per patch:
  colour jitter, colour dropping and horizontal flip -> ``{"patches"}`` (grid * grid, 3, p, p).

All end in the size of the model's data contract. The training transforms run in the data
pipeline's worker processes, from its per-sample seed, and end in uint8 (3, H, W) tensors: a
quarter of the bytes of fp32 through worker IPC and the host-to-device copy. The trainer
normalises on the device right after the copy (:func:`to_model_input`), with the same fp32
operations the workers ran before, so the values are unchanged bit for bit. ``eval`` serves
in-process consumers (evaluation, curation scoring) and ends normalised in fp32 itself.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop as RandomResizedCropParams
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from pipeline.core.registry import Registry
from train.config import DataConfig
from train.contract import DataContract

TRANSFORMS: Registry = Registry("transform")
Transform = Callable[[Image.Image], dict]


def normalize(images: torch.Tensor, contract: DataContract) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> fp32 scaled to [0, 1] and normalised by the contract's mean and std."""
    return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(contract.mean), list(contract.std))


def to_model_input(batch: dict, contract: DataContract, dtype: torch.dtype, channels_last: bool = False) -> dict:
    """A training batch on the device -> the model's input: uint8 images (every uint8 tensor of a
    batch is an image batch: "image", "view1", "view2") normalised in fp32, then cast to ``dtype``;
    other tensors unchanged. ``channels_last`` lays images out NHWC, which makes cuDNN choose its NHWC
    convolutions. Only the images: ``model.to(memory_format=torch.channels_last)`` breaks DeepSpeed's
    initial parameter broadcast ("self.stride(-1) must be 1 to view Float as Byte"), and ZeRO's flat
    parameter buffers would not keep that layout anyway."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return {k: normalize(v, contract).to(dtype, memory_format=memory_format) if v.dtype == torch.uint8 else v
            for k, v in batch.items()}


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


class ALBEFRandAugment(T.RandAugment):
    """RandAugment over the operations of ALBEF's pretraining transform (its ``RandomAugment(2, 7, augs=...)``):
    torchvision's space without Color, Contrast, Posterize and Solarize. torchvision applies each drawn op
    (ALBEF: each with p = 0.5) on a magnitude scale of 11 bins, 0-10 as ALBEF's."""

    _AUGMENTATION_SPACE = {name: op for name, op in T.RandAugment._AUGMENTATION_SPACE.items()
                           if name not in ("Color", "Contrast", "Posterize", "Solarize")}


@TRANSFORMS.register("clip_train")
def clip_train(cfg: DataConfig, contract: DataContract) -> Transform:
    # The flip leaves captions as they are ("left" stays "left"), as ALBEF's and BLIP's pretraining do: a
    # text-aware flip would rewrite captions, which the loader tokenizes after the image transform.
    steps = [RandomResizedCrop(contract.image_size, cfg.crop_scale, contract.interpolation), T.PILToTensor()]
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    if cfg.randaugment_ops:
        # Bilinear shears and rotations: torchvision has no bicubic affine for uint8 tensors
        steps.append(ALBEFRandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude, num_magnitude_bins=11,
                                      interpolation=T.InterpolationMode.BILINEAR))
    transform = T.Compose(steps)
    return lambda image: {"image": transform(image)}  # uint8 (3, H, W)


@TRANSFORMS.register("eval")
def eval_transform(cfg: DataConfig | None, contract: DataContract) -> Transform:
    resize = T.Resize(contract.image_size, interpolation=interpolation_mode(contract))
    transform = T.Compose([resize, T.CenterCrop(contract.image_size), T.PILToTensor()])
    return lambda image: {"image": normalize(transform(image.convert("RGB")), contract)}  # fp32 (3, H, W)


# ---------------------------------------------------------------------------- two views (SimCLR, MoCo v2)

# Colour jitter (brightness, contrast, saturation, hue) at strength 1. SimCLR scales
# (0.8, 0.8, 0.8, 0.2) by its strength s; MoCo v2 uses (0.4, 0.4, 0.4, 0.1), i.e. s = 0.5.
JITTER = {"simclr": (0.8, 0.8, 0.8, 0.2), "moco_v2": (0.4, 0.4, 0.4, 0.1)}


def augmentation(jitter: tuple[float, ...], crop_scale: tuple[float, float], contract: DataContract) -> T.Compose:
    """One view's random augmentation (uint8 throughout), ending in the contract's size."""
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
    ])


def two_views(preset: str) -> Callable[[DataConfig, DataContract], Transform]:
    """The TRANSFORMS builder of a preset: ``(data config, contract) -> image -> two views``."""

    def build(cfg: DataConfig, contract: DataContract) -> Transform:
        jitter = tuple(cfg.jitter_strength * j for j in JITTER[preset])
        augment = augmentation(jitter, cfg.crop_scale, contract)
        return lambda image: {"view1": augment(image), "view2": augment(image)}  # uint8 (3, H, W) each

    return build


for _preset in JITTER:
    TRANSFORMS.register(_preset, two_views(_preset))


# ---------------------------------------------------------------------------- patches (CPC v2)

PATCH_JITTER_P = 0.8  # SimCLR's; v2 jitters each patch on its own
PATCH_DROP_P = 0.5  # colour dropping (Doersch et al. 2015, used by CPC v2): keep one channel of three
PATCH_FLIP_P = 0.5


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, h, w) -> (n, 1, h, w) luma, torchvision's weights."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def augment_patches(patches: torch.Tensor, strength: tuple[float, float, float]) -> torch.Tensor:
    """uint8 (n, 3, h, w) patches, each with its own draws: brightness, contrast and saturation
    jitter (factors in 1 +- strength; hue is left out: per patch it costs a colour-space round trip
    each), colour dropping (the other two channels set to mid-grey) and a horizontal flip.
    Vectorised over patches: a torchvision transform per patch would cost ~grid^2 calls per sample."""
    n = patches.shape[0]
    x = patches.float()

    def draw(p: float) -> torch.Tensor:
        return torch.rand(n, 1, 1, 1) < p

    def factor(s: float) -> torch.Tensor:
        return 1 + (2 * torch.rand(n, 1, 1, 1) - 1) * s

    brightness, contrast, saturation = strength
    y = (x * factor(brightness)).clamp_(0, 255)
    mean = _grey(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * factor(contrast) + mean).clamp_(0, 255)
    grey = _grey(y)
    y = ((y - grey) * factor(saturation) + grey).clamp_(0, 255)
    x = torch.where(draw(PATCH_JITTER_P), y, x)
    kept = torch.nn.functional.one_hot(torch.randint(3, (n,)), 3).bool().view(n, 3, 1, 1)
    x = torch.where(draw(PATCH_DROP_P) & ~kept, 128.0, x)
    x = torch.where(draw(PATCH_FLIP_P), x.flip(-1), x)
    return x.round_().to(torch.uint8)


@TRANSFORMS.register("cpc")
def cpc_patches(cfg: DataConfig, contract: DataContract) -> Transform:
    crop = T.Compose([
        T.PILToTensor(),
        T.RGB(),
        T.RandomResizedCrop(contract.image_size, scale=cfg.crop_scale, interpolation=interpolation_mode(contract),
                            antialias=True),
        T.RandomHorizontalFlip(),
    ])
    strength = tuple(cfg.jitter_strength * j for j in JITTER["simclr"][:3])
    return lambda image: {"patches": augment_patches(contract.cut_patches(crop(image)), strength)}  # uint8 (P, 3, p, p)
