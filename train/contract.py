"""The data contract a model carries: how its inputs must be prepared.

Every registered model exposes ``model.contract``; the training data pipeline, the
evaluation transforms and the curation scorer all derive their preprocessing from it, so
a model never meets inputs prepared for another.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(kw_only=True, frozen=True)
class DataContract:
    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    tokenizer: str = "clip_bpe"  # a name in the tokenizer registry; "" for image-only models
    tokenizer_path: str = ""  # local files for tokenizers that need them (Hugging Face)
    context_length: int = 77
    # CPC: training inputs are a grid of overlapping square patches of the image (0 = whole images)
    patch_size: int = 0
    patch_stride: int = 0

    @property
    def grid(self) -> int:
        """Patches per side of the image's patch grid."""
        return (self.image_size - self.patch_size) // self.patch_stride + 1

    def cut_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(..., C, H, W) images of the contract's size -> (..., grid * grid, C, patch, patch), rows
        of the grid in order: the one patch layout of the CPC transform and model."""
        size, stride = self.patch_size, self.patch_stride
        patches = images.unfold(-2, size, stride).unfold(-2, size, stride)  # (..., C, G, G, p, p)
        patches = patches.movedim(-5, -3)  # (..., G, G, C, p, p)
        return patches.flatten(-5, -4)
