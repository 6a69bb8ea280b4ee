"""Evaluation: zero-shot classification, retrieval (with ITM rerank) and linear probe.

``run(cfg, encoder=None) -> list[result dict]`` evaluates one model on one dataset for
every configured task; ``EvalConfig`` is its schema (``configs/eval/*.yaml``). Tasks and
datasets are registries (``TASKS``, ``DATASETS``): a new one is a class plus a decorator.
"""

from pipeline.evaluation import linear_probe, retrieval, zeroshot_classification  # noqa: F401  (register tasks)
from pipeline.evaluation.datasets import DATASETS, EvalSet
from pipeline.evaluation.runner import EvalConfig, run
from pipeline.evaluation.tasks import TASKS

__all__ = ["DATASETS", "TASKS", "EvalConfig", "EvalSet", "run"]
