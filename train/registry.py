"""The trainer's registries: a model or objective is a new file plus a ``register`` decorator.

- ``MODELS``: name -> builder ``(cfg) -> nn.Module``; the model returns features, nothing else.
- ``OBJECTIVES``: name -> builder of an ``nn.Module`` that owns the model and everything the
  objective needs (losses, temperature, momentum encoders, queues) and whose ``forward(batch)``
  returns a dict with ``loss`` plus named, detached-for-logging terms.
"""

from pipeline.registry import Registry

MODELS: Registry = Registry("model")
OBJECTIVES: Registry = Registry("objective")
