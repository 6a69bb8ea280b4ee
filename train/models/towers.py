"""The one way every model family builds a timm image tower (CLIP, ALBEF, SimCLR/MoCo), and the
one way a model is compiled (``run.compile``)."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn


def timm_tower(name: str, kwargs: dict[str, Any], weights: str = "") -> nn.Module:
    """A timm backbone returning pooled features (no classifier): random init, or a local weights
    file (nothing is downloaded)."""
    local = dict(pretrained=True, pretrained_cfg_overlay=dict(file=weights)) if weights else {}
    return timm.create_model(name, num_classes=0, **local, **kwargs)


def compile_blocks(module: nn.Module) -> int:
    """Regional compilation, as torchtitan does it: ``Module.compile()`` on every block of each stack
    of identical blocks (ViT and text transformer blocks, BERT layers, ResNet bottlenecks), in place.

    Blocks and not the whole model: objectives call towers through methods (``encode_image``,
    ``image_tokens``) that a compiled ``forward`` would not cover; identical blocks share one
    compiled graph, so compilation stays short; the collectives of global BatchNorm and the
    feature gathers stay outside the graphs. In place, so the parameters stay the modules' own and
    DeepSpeed partitions them as usual. Returns the number of blocks compiled.
    """
    count = 0
    for child in module.children():
        stack = isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) > 0
        if stack and len({type(block) for block in child}) == 1 and any(True for _ in child.parameters()):
            for block in child:
                block.compile()
            count += len(child)
        else:
            count += compile_blocks(child)
    return count
