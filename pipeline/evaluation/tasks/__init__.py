"""Evaluation tasks; each module registers its task in ``pipeline.evaluation.task.TASKS``."""
