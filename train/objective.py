"""What the trainer calls on an objective: the :class:`Objective` protocol.

An objective is an ``nn.Module`` that owns the model (as ``.model``) and everything its loss
needs (temperature, momentum encoders, queues). It subclasses ``nn.Module`` and this protocol;
the hooks it does not need keep the defaults here, so the trainer calls every hook of every
objective and never probes for one.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from train.queue import FeatureQueue


class Objective(Protocol):
    model: nn.Module

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"loss": scalar, **named terms}``; the terms are detached and only logged."""
        ...

    def check(self, global_batch: int, world_size: int) -> None:
        """Raise before training when the micro-batch of all ranks does not suit the objective.
        By default every feature queue must be tiled exactly by it."""
        for module in self.modules():
            if isinstance(module, FeatureQueue):
                module.check(global_batch)

    def start_step(self, step: int, steps_per_epoch: int) -> None:
        """Before the step's first micro-batch (schedules that depend on the step)."""

    def end_step(self) -> None:
        """After the optimizer step (temperature clamp, momentum update)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides every parameter with ndim < 2."""
        return set()
