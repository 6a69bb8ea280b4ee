"""CPC v2 for images (van den Oord et al. 2018; Hénaff et al. 2019): patch encoder, row-causal
context network, one linear predictor per row offset.

The image is a grid of overlapping patches (``DataContract.cut_patches``). Each patch is encoded
on its own by a timm backbone whose normalisation is LayerNorm: BatchNorm would normalise the
patches of one image together and leak what the predictions must infer. A PixelCNN-style context
network turns the (G, G) grid of patch embeddings z into contexts c, where c[i, j] sees only the
rows <= i, and ``predictors[k - 1](c[i, j])`` predicts z[i + k, j] for k = 1..K.

``encode_image`` is the mean of the contexts over the grid (v2's linear evaluation pools the
context network's output), so the evaluation stage's linear probe and kNN apply unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train.contract import DataContract
from train.models.towers import timm_tower
from train.precision import full_precision
from train.registry import MODELS


class RowCausalConv(nn.Conv2d):
    """A (k, k) convolution whose output at row i reads only rows <= i: the masked convolution of
    PixelCNN with every kernel row below the centre masked, done by padding above the grid only."""

    def __init__(self, channels: int, kernel: int):
        super().__init__(channels, channels, (kernel // 2 + 1, kernel), padding=0)
        self.pad = (kernel // 2, kernel // 2, kernel // 2, 0)  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


class ContextBlock(nn.Module):
    """Pre-activation residual bottleneck: 1x1, row-causal k x k, 1x1 (v2's context ResNet)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        hidden = channels // 4
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.causal = RowCausalConv(hidden, kernel)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.reduce(F.relu(x))
        h = self.causal(F.relu(h))
        return x + self.expand(F.relu(h))


@MODELS.register("cpc")
class CPCModel(nn.Module):
    @dataclasses.dataclass(kw_only=True)
    class Config:
        name: str = "cpc"
        backbone: str = "resnet50"  # any timm model name; built with random init
        backbone_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra timm kwargs
        norm_layer: str = "layernorm2d"  # timm name of the patch encoder's normalisation; never BatchNorm
        pretrained_path: str = ""  # optional local timm weights file (nothing is downloaded)
        image_size: int = 256  # v2: a 7 x 7 grid of 64 px patches, stride 32
        patch_size: int = 64
        patch_stride: int = 32
        context_dim: int = 1024
        context_layers: int = 2
        context_kernel: int = 3
        predict_rows: int = 3  # K: predictions reach 1..K rows below their context

        def validate(self) -> None:
            if not 0 < self.patch_size <= self.image_size or self.patch_stride < 1:
                raise ValueError(f"need 0 < patch_size <= image_size and patch_stride >= 1, got {self.patch_size}, "
                                 f"{self.image_size}, {self.patch_stride}")
            if (self.image_size - self.patch_size) % self.patch_stride:
                raise ValueError(f"patches of {self.patch_size} px at stride {self.patch_stride} do not tile "
                                 f"image_size {self.image_size}")
            grid = (self.image_size - self.patch_size) // self.patch_stride + 1
            if not 1 <= self.predict_rows < grid:
                raise ValueError(f"predict_rows must be in 1..{grid - 1} (a grid of {grid} rows), got {self.predict_rows}")
            if self.context_kernel < 1 or self.context_kernel % 2 == 0 or self.context_dim < 4:
                raise ValueError("context_kernel must be odd and context_dim >= 4")

    def __init__(self, cfg: Config):
        super().__init__()
        self.backbone = timm_tower(cfg.backbone, {"norm_layer": cfg.norm_layer, **cfg.backbone_args},
                                   cfg.pretrained_path)
        batchnorm = [type(m).__name__ for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batchnorm:
            raise ValueError(f"model.backbone {cfg.backbone} still has {batchnorm[0]}, which mixes the patches of an "
                             "image: use a LayerNorm-type model.norm_layer and a backbone that takes timm's norm_layer")
        pretrained = self.backbone.pretrained_cfg
        self.contract = DataContract(
            image_size=cfg.image_size,
            mean=tuple(pretrained["mean"]),
            std=tuple(pretrained["std"]),
            interpolation=pretrained.get("interpolation", "bicubic"),
            tokenizer="",
            patch_size=cfg.patch_size,
            patch_stride=cfg.patch_stride,
        )
        dim, grid, rows = self.backbone.num_features, self.contract.grid, cfg.predict_rows
        self.context = nn.Sequential(nn.Conv2d(dim, cfg.context_dim, 1),
                                     *[ContextBlock(cfg.context_dim, cfg.context_kernel) for _ in range(cfg.context_layers)])
        self.predictors = nn.ModuleList(nn.Linear(cfg.context_dim, dim) for _ in range(rows))
        # The patch each prediction is for, as an index into the grid (row-major), predictions
        # ordered by k, then context row i, then column j.
        targets = [(i + k) * grid + j for k in range(1, rows + 1) for i in range(grid - k) for j in range(grid)]
        self.register_buffer("target_index", torch.tensor(targets), persistent=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def encode_patches(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, G * G, 3, p, p) -> patch embeddings z (B, G * G, D) and contexts (B, C, G, G)."""
        b, count = patches.shape[:2]
        grid = self.contract.grid
        # fp32 under bf16 autocast: with a bf16 patch encoder the tiny config's loss went to chance
        # (7.36) or NaN within 16 steps while fp32 fell; with only this in fp32 it tracks fp32.
        z = full_precision(self.backbone)(patches.flatten(0, 1)).view(b, count, -1)
        contexts = self.context(z.transpose(1, 2).unflatten(2, (grid, grid)))
        return z, contexts

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, context_dim): contexts averaged over the image's patch grid."""
        _, contexts = self.encode_patches(self.contract.cut_patches(images))
        return contexts.mean(dim=(2, 3))

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, G * G, 3, p, p) -> z (B, G * G, D) and the predictions (B, M, D) of the patches
        ``target_index`` names, M = sum over k of (G - k) * G."""
        z, contexts = self.encode_patches(patches)
        grid = self.contract.grid
        predictions = [predict(contexts[:, :, : grid - k].flatten(2).transpose(1, 2))  # rows 0..G-k-1 predict row i+k
                       for k, predict in enumerate(self.predictors, start=1)]
        return z, torch.cat(predictions, dim=1)
