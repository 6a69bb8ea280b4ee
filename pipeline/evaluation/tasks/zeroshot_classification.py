"""Zero-shot classification: a classifier built from class names and prompt templates.

Each class's weight is the mean of its normalised prompt embeddings, renormalised (the CLIP
paper's prompt ensembling); images are classified by cosine similarity to the weights.
"""

from __future__ import annotations

import dataclasses

import torch

from pipeline.evaluation import metrics, plots
from pipeline.evaluation.features import EvalContext
from pipeline.evaluation.task import TASKS, TaskConfig, TaskResult


def classifier(ctx: EvalContext, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """(C, D) class weights from the C x T prompts."""
    prompts = [template.format(c=name) for name in classnames for template in templates]
    text = ctx.text_features(prompts).view(len(classnames), len(templates), -1)  # (C, T, D)
    return torch.nn.functional.normalize(text.mean(1), dim=-1)


def labels_of(records: list[dict], dataset: str) -> torch.Tensor:
    if records and "label" not in records[0]:
        raise ValueError(f"dataset {dataset!r} has no class labels (classification needs them)")
    return torch.tensor([r["label"] for r in records], dtype=torch.long)


@TASKS.register("zeroshot_classification")
class ZeroShotClassification:
    @dataclasses.dataclass(kw_only=True)
    class Config(TaskConfig):
        pass

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def run(self, ctx: EvalContext) -> TaskResult:
        if not hasattr(ctx.model, "encode_text"):
            raise ValueError(f"{ctx.encoder.name} has no text tower: zero-shot classification needs one")
        classnames = ctx.data.classnames
        weights = classifier(ctx, classnames, ctx.data.templates)  # (C, D)
        images = ctx.images()
        labels = labels_of(images["records"], ctx.data.cfg.name)
        if int(labels.max()) >= len(classnames):
            raise ValueError(f"label {int(labels.max())} but only {len(classnames)} class names")
        logits = 100.0 * images["features"] @ weights.T  # (N, C)
        return TaskResult(
            metrics.classification(logits, labels),
            {"predictions": logits.argmax(1), "labels": labels, "classnames": classnames},
        )

    def plot(self, result: TaskResult, prefix: str) -> list[str]:
        d = result.details
        return [plots.confusion_matrix(d["labels"], d["predictions"], d["classnames"], f"{prefix}_confusion.png")]
