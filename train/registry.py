"""The trainer's registries: a model or objective is a new file plus a ``register`` decorator.

- ``MODELS`` (every module of ``train/models/``): name -> builder ``(cfg) -> nn.Module``; the
  model returns features, nothing else.
- ``OBJECTIVES`` (every module of ``train/objectives/``): name -> builder of an
  :class:`train.objective.Objective`, the ``nn.Module`` that owns the model and everything the
  objective needs (losses, temperature, momentum encoders, queues).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Callable

from pipeline.core.registry import Registry

MODELS: Registry = Registry("model", package="train.models")
OBJECTIVES: Registry = Registry("objective", package="train.objectives")


def register_variants(base: type, build: Callable[[Any], Any], variants: dict[str, dict[str, Any]]) -> None:
    """Register each named variant of a model family in ``MODELS``.

    A variant is ``base`` (the family's config dataclass) with other defaults, usually just
    architecture numbers; its entry builds with ``build(cfg)`` and exposes the subclass as ``.Config``.
    """
    types = {f.name: f.type for f in dataclasses.fields(base)}
    for name, defaults in variants.items():
        fields = [("name", "str", dataclasses.field(default=name))]
        for key, value in defaults.items():  # a factory, so no two configs share a mutable default
            fields.append((key, types[key], dataclasses.field(default_factory=functools.partial(copy.deepcopy, value))))
        config = dataclasses.make_dataclass(f"{name}_config", fields, bases=(base,), kw_only=True)
        config.__module__ = base.__module__  # its string annotations resolve in the family's module

        def entry(cfg: Any, _build: Callable[[Any], Any] = build) -> Any:
            return _build(cfg)

        entry.Config = config
        MODELS.register(name, entry)
