"""The task registry: ``tasks: [{name: zeroshot_classification, ...}, ...]`` in an eval config.

A task is a class with a ``Config`` dataclass and ``run(ctx) -> TaskResult``; it reads
gathered features from the :class:`~pipeline.evaluation.features.Context` and returns the
same numbers on every rank. ``plot(result, prefix)`` writes its PNGs (called on rank 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.registry import Registry

TASKS: Registry = Registry("eval task")


@dataclasses.dataclass(kw_only=True)
class TaskConfig:
    name: str

    @classmethod
    def config_for(cls, raw: dict) -> type:
        if "name" not in raw:
            raise KeyError(f"needs a 'name' (one of {', '.join(TASKS.names())})")
        return TASKS.get(raw["name"]).Config


@dataclasses.dataclass
class TaskResult:
    metrics: dict[str, float]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # arrays for the plots, not saved
