"""What an evaluation task is: ``tasks: [{name: zeroshot_classification, ...}, ...]`` in an eval config.

A task is a class in ``pipeline/evaluation/tasks/`` registered in :data:`TASKS`, with a
``Config`` dataclass (a :class:`TaskConfig`) and ``run(ctx) -> TaskResult``; it reads
gathered features from the :class:`~pipeline.evaluation.features.EvalContext` and returns the
same numbers on every rank. ``plot(result, prefix)`` writes its PNGs (called on rank 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.core.config import Section
from pipeline.core.registry import Registry

TASKS: Registry = Registry("eval task", package="pipeline.evaluation.tasks")


@dataclasses.dataclass(kw_only=True)
class TaskConfig(Section):
    """The keys of the named task's ``Config`` (a subclass of this one)."""

    registry = TASKS


@dataclasses.dataclass
class TaskResult:
    metrics: dict[str, float]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # arrays for the plots, not saved
