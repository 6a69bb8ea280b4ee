"""What the trainer calls on an objective: the :class:`Objective` protocol.

An objective is an ``nn.Module`` that owns the model (as ``.model``) and everything its loss
needs (temperature, momentum encoders, queues). It subclasses ``nn.Module`` and this protocol;
the hooks it does not need keep the defaults here, so the trainer calls every hook of every
objective and never probes for one.

A contrastive objective whose loss reads each sample only through its features (CLIP, SimCLR)
also subclasses :class:`CachesFeatures`: with ``grad_accum = k`` one optimizer step then
contrasts all ``b x k x world`` samples, through a :class:`FeatureCache`.
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


class FeatureCache:
    """The features of one optimizer step's micro-batches (GradCache, Gao et al. 2021; open_clip's
    ``--accum-freq``).

    First each micro-batch's features are computed without gradient and stored. Then micro-batch
    ``i`` runs again with gradient, its features take the place of part ``i``, and the backward of
    the loss over all parts gives that part's share of the gradient; summed over the k passes it
    is the gradient of the one loss over all ``b x k x world`` samples, at the activation memory
    of one micro-batch.
    """

    def __init__(self):
        self.parts: list[dict[str, torch.Tensor]] = []
        self.index: int | None = None  # None while storing

    def store(self, features: dict[str, torch.Tensor]) -> None:
        self.parts.append({name: value.detach() for name, value in features.items()})

    def select(self, index: int) -> "FeatureCache":
        self.index = index
        return self

    def merged(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All parts in order (rows of micro-batch 0 first), part ``index`` replaced by ``features``."""
        return {name: torch.cat([features[name] if i == self.index else part[name] for i, part in enumerate(self.parts)])
                for name in features}


class CachesFeatures:
    """Mixin (listed before ``nn.Module``): ``forward = loss(features(batch))``, or through a cache."""

    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample features, (b, ...) each; the loss couples samples only through these."""
        raise NotImplementedError

    def loss(self, features: dict[str, torch.Tensor], owns_parameters: bool) -> dict[str, torch.Tensor]:
        """The objective's outputs from the features of all samples. A parameter the loss reads
        directly (the temperature) is detached unless ``owns_parameters``: of the k passes over
        one cache, only the first gives it its gradient, which would otherwise count k times."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor], cache: FeatureCache | None = None) -> dict[str, torch.Tensor]:
        features = self.features(batch)
        if cache is None:
            return self.loss(features, owns_parameters=True)
        if cache.index is None:
            cache.store(features)
            return {}
        return self.loss(cache.merged(features), owns_parameters=cache.index == 0)
