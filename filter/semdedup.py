"""The embedding dedupe level (SemDeDup) as bucketed tasks over memory-mapped float16 parts.

k-means (``rows / cluster_size`` centroids) is trained on a fixed-size sample, each row joins its
nearest ``probes`` clusters, and a reduce task loads one cluster's members at a time and keeps
the pairs whose cosine passes ``threshold`` (and, with ``margin``, beats both items' k-th
neighbour by it). Embeddings stay float16 on disk; only one cluster's members and a block of its
similarity rows are ever float32.
"""

from __future__ import annotations

import numpy as np

from filter.buckets import BucketLevel
from filter.dedupe import LEVELS


@LEVELS.register("embedding")
class Embedding(BucketLevel):
    reason, kind = "semantic_dup", "embed"

    def settings(self) -> tuple[int, int, int]:
        c = self.ctx.cfg.embedding
        return c.cluster_size, c.probes, c.sample

    def keys(self, x: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(x, np.float32)]

    def find_pairs(self, x: np.ndarray) -> np.ndarray:
        return cluster_pairs(x, self.ctx.cfg.embedding)


def cluster_pairs(x: np.ndarray, cfg) -> np.ndarray:
    """(p, 2) pairs (i < j) of rows of ``x`` (one cluster's embeddings) that are copies under ``cfg``
    (an EmbeddingDedupeConfig), computed ``cfg.block_rows`` similarity rows at a time."""
    import torch  # here, not at module level: the other phases' tasks start without it

    x = torch.from_numpy(np.asarray(x, np.float32))
    m, k = len(x), cfg.background_k
    if m < 2:
        return np.zeros((0, 2), np.int64)
    use_margin = cfg.margin > 0 and m > k
    a, b, s = [], [], []
    background = torch.empty(m)
    for start in range(0, m, cfg.block_rows):
        sim = x[start : start + cfg.block_rows] @ x.T  # (block, m)
        rows = torch.arange(start, start + len(sim))
        sim[rows - start, rows] = -1.0
        if use_margin:
            background[rows] = sim.topk(k, dim=1).values[:, -1]  # each item's k-th neighbour similarity
        i, j = torch.nonzero((sim >= cfg.threshold) & (rows[:, None] < torch.arange(m)[None, :]), as_tuple=True)
        a.append(i + start), b.append(j), s.append(sim[i, j])  # few: the margin is tested on these only
    a, b, s = torch.cat(a), torch.cat(b), torch.cat(s)
    if use_margin:
        keep = s - torch.maximum(background[a], background[b]) >= cfg.margin
        a, b = a[keep], b[keep]
    return np.stack([a.numpy(), b.numpy()], 1).astype(np.int64)
