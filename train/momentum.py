"""Momentum (EMA) copies of online modules: ALBEF's momentum encoders and MoCo's key encoder.

The copies are registered submodules (saved, loaded and partitioned with everything else)
with ``requires_grad=False``, so they get no gradient and no optimizer state. The update reads
whole parameters, so ZeRO-3 (which partitions them) is refused at start-up by train/parallel.py.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Momentum(nn.Module):
    """EMA copies of named modules: ``p_m <- m * p_m + (1 - m) * p`` after every step."""

    def __init__(self, momentum: float, **online: nn.Module):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.copies = nn.ModuleDict({name: copy.deepcopy(m).requires_grad_(False) for name, m in online.items()})
        # Plain list: the online modules are owned (and registered) elsewhere.
        self._online = list(online.values())

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]

    def pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        momentum = [p.data for m in self.copies.values() for p in m.parameters()]
        online = [p.data for m in self._online for p in m.parameters()]
        return momentum, online

    @torch.no_grad()
    def update(self) -> None:
        momentum, online = self.pairs()
        torch._foreach_lerp_(momentum, online, 1.0 - self.momentum)
