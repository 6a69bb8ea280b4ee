"""Image-only encoder for SimCLR and MoCo v2: a timm backbone plus an MLP projection head.

The representation is the backbone's pooled output, *before* the head (SimCLR shows the
head discards information the downstream task needs); ``encode_image`` returns it for the
linear probe, ``forward`` returns the projection the contrastive losses use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from train.batchnorm import convert_global_batchnorm
from train.contract import DataContract
from train.models.towers import timm_tower
from train.registry import MODELS


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, layers: int, batch_norm: bool) -> nn.Sequential:
    """``layers`` linear layers with ReLU between (MoCo v2 and SimCLR v1: 2; SimCLR v2: 3).

    ``batch_norm`` (SimCLR's ``use_bn``): BatchNorm after every linear layer, whose bias it makes
    redundant; the last one without the affine shift and scale (SimCLR keeps the scale there, but torch's
    BatchNorm1d has both or neither, and the loss normalises the projection anyway).
    """
    dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    blocks: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == layers - 1
        blocks.append(nn.Linear(d_in, d_out, bias=not batch_norm))
        if batch_norm:
            blocks.append(nn.BatchNorm1d(d_out, affine=not last))
        if not last:
            blocks.append(nn.ReLU(inplace=True))
    return nn.Sequential(*blocks)


@MODELS.register("ssl")
class SSLEncoder(nn.Module):
    @dataclasses.dataclass(kw_only=True)
    class Config:
        name: str = "ssl"
        backbone: str = "resnet50"  # any timm model name; built with random init
        backbone_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra timm kwargs
        pretrained_path: str = ""  # optional local timm weights file (nothing is downloaded)
        image_size: int = 224
        head_hidden_dim: int = 2048
        head_dim: int = 128
        head_layers: int = 2
        head_bn: bool = False  # BatchNorm in the projection head (SimCLR v1/v2's use_bn; MoCo v2 has none)
        sync_bn: bool = False  # BatchNorm statistics over the global batch (SimCLR's global BN), head included

        def validate(self) -> None:
            if self.head_layers < 1:
                raise ValueError(f"head_layers must be >= 1, got {self.head_layers}")

    def __init__(self, cfg: Config):
        super().__init__()
        self.backbone = timm_tower(cfg.backbone, cfg.backbone_args, cfg.pretrained_path)
        self.head = projection_head(self.backbone.num_features, cfg.head_hidden_dim, cfg.head_dim, cfg.head_layers,
                                    cfg.head_bn)
        if cfg.sync_bn:
            convert_global_batchnorm(self.backbone)
            convert_global_batchnorm(self.head)
        self.head_dim = cfg.head_dim
        pretrained = self.backbone.pretrained_cfg
        self.contract = DataContract(
            image_size=cfg.image_size,
            mean=tuple(pretrained["mean"]),
            std=tuple(pretrained["std"]),
            interpolation=pretrained.get("interpolation", "bicubic"),
            tokenizer="",
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) representation before the projection head."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, head_dim) projection, not normalised."""
        return self.head(self.backbone(images))
