"""The one way every model family builds a timm image tower (CLIP, ALBEF, SimCLR/MoCo)."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn


def timm_tower(name: str, kwargs: dict[str, Any], weights: str = "") -> nn.Module:
    """A timm backbone returning pooled features (no classifier): random init, or a local weights
    file (nothing is downloaded)."""
    local = dict(pretrained=True, pretrained_cfg_overlay=dict(file=weights)) if weights else {}
    return timm.create_model(name, num_classes=0, **local, **kwargs)
