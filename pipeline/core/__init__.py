"""The shared core every stage builds on: config, logging, file I/O, registries, the data
layout and task slicing. It imports nothing from the stages above it (``train``, ``filter``,
``pipeline.evaluation`` and the ``pipeline`` commands); ``tests/test_layers.py`` checks that."""
