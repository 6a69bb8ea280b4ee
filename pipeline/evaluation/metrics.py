"""Metrics as CLIP_benchmark reports them, computed from score matrices.

Ties count against the model: the true class (or caption, or image) is within the top k
only if fewer than k wrong entries score *at least* as high. A model that scores
everything equally therefore gets no credit, and the result does not depend on the order
in which ranks gathered the candidates.
"""

from __future__ import annotations

import math

import torch


def rank_of_true(scores: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(Q, C) scores, (Q,) index of the true column -> (Q,) 0-based rank, ties counted against."""
    positives = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, true[:, None], True)
    return best_positive_rank(scores, positives)


def classification(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 (NaN with fewer than 5 classes) and mean per-class recall (balanced accuracy)."""
    ranks = rank_of_true(logits, labels)
    correct1 = (ranks < 1).float()
    classes = labels.unique()
    per_class = torch.stack([correct1[labels == c].mean() for c in classes])
    return {
        "acc1": correct1.mean().item(),
        "acc5": (ranks < 5).float().mean().item() if logits.shape[1] >= 5 else math.nan,
        "mean_per_class_recall": per_class.mean().item(),
    }


def best_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """(Q, C) scores, (Q, C) bool positives -> (Q,) rank of each query's best-ranked positive:
    the number of negatives scoring at least as high as its highest-scoring positive."""
    best = scores.masked_fill(~positives, -math.inf).max(1, keepdim=True).values  # (Q, 1)
    return ((scores >= best) & ~positives).sum(1)


def recall_curve(ranks: torch.Tensor, max_k: int) -> list[float]:
    """Recall@k for k = 1..max_k: the fraction of queries with a positive in their top k."""
    return [(ranks < k).float().mean().item() for k in range(1, max_k + 1)]


def retrieval_ranks(i2t: torch.Tensor, t2i: torch.Tensor, caption_image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ranks for both directions from (I, T) image->text and (T, I) text->image scores (for a dual
    encoder, one similarity matrix and its transpose); ``caption_image[j]`` is caption j's image.

    image -> text: an image is found at the rank of its best caption (it may have several);
    text -> image: each caption has exactly one image.
    """
    positives = caption_image[None, :] == torch.arange(i2t.shape[0])[:, None]  # (I, T)
    return {
        "image_to_text": best_positive_rank(i2t, positives),
        "text_to_image": rank_of_true(t2i, caption_image),
    }


def retrieval(ranks: dict[str, torch.Tensor], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """``text_retrieval_recall@k`` (image -> text) and ``image_retrieval_recall@k`` (text -> image)."""
    out = {}
    for direction, key in (("image_to_text", "text_retrieval"), ("text_to_image", "image_retrieval")):
        for k in ks:
            out[f"{key}_recall@{k}"] = (ranks[direction] < k).float().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out
