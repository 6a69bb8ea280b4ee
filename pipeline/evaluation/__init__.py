"""Evaluation: zero-shot classification, retrieval (with ITM rerank) and linear probe.

``run(cfg, encoder=None) -> list[result dict]`` evaluates one model on one dataset for
every configured task; ``EvalConfig`` is its schema (``configs/eval/*.yaml``). Tasks and
datasets are registries (``TASKS``, ``DATASETS``): a new one is a class plus a decorator.
"""

from pipeline.evaluation.datasets import DATASETS, EvalSet
from pipeline.evaluation.runner import EvalConfig, run
from pipeline.evaluation.task import TASKS

__all__ = ["DATASETS", "TASKS", "EvalConfig", "EvalSet", "run"]
