"""The embedding dedupe level (SemDeDup) as bucketed tasks over memory-mapped float16 parts.

k-means (``rows / cluster_size`` centroids) is trained on a fixed-size sample, each row is listed
in its nearest cluster and compared with the listed rows of its nearest ``probes`` clusters (a
reduce task loads one cluster's members at a time), and the pairs kept are those whose cosine
passes ``threshold`` (and, with ``margin``, beats both items' k-th neighbour by it). Embeddings stay float16 on disk; only one cluster's members and a block of its
similarity rows are ever float32.
"""

from __future__ import annotations

import numpy as np
import torch

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

    def find_pairs(self, x: np.ndarray, listed: np.ndarray) -> np.ndarray:
        return cluster_pairs(x, self.ctx.cfg.embedding, listed)


def cluster_pairs(x: np.ndarray, cfg, listed: np.ndarray | None = None) -> np.ndarray:
    """(p, 2) pairs (i < j) of rows of ``x`` (one cluster's embeddings), one of them among the rows
    ``listed`` (every row when None), that are copies under ``cfg`` (an EmbeddingDedupeConfig):
    each row against the listed rows, ``cfg.block_rows`` rows at a time; a row's background is its
    k-th neighbour among the listed rows."""
    x = torch.from_numpy(np.asarray(x, np.float32))
    listed = torch.arange(len(x)) if listed is None else torch.from_numpy(np.asarray(listed, np.int64))
    m, k, base = len(x), cfg.background_k, x[listed]
    if m < 2 or len(listed) == 0:
        return np.zeros((0, 2), np.int64)
    use_margin = cfg.margin > 0 and len(listed) > k
    at = torch.full((m,), -1, dtype=torch.int64)
    at[listed] = torch.arange(len(listed))  # a row's column among the listed, if it is one
    a, b, s = [], [], []
    background = torch.empty(m)
    for start in range(0, m, cfg.block_rows):
        sim = x[start : start + cfg.block_rows] @ base.T  # (block, listed)
        rows = torch.arange(start, start + len(sim))
        mine = at[rows] >= 0
        sim[(rows - start)[mine], at[rows][mine]] = -1.0
        if use_margin:
            background[rows] = sim.topk(k, dim=1).values[:, -1]  # each item's k-th neighbour similarity
        i, j = torch.nonzero(sim >= cfg.threshold, as_tuple=True)
        a.append(i + start), b.append(listed[j]), s.append(sim[i, j])  # few: the margin is tested on these only
    a, b, s = torch.cat(a), torch.cat(b), torch.cat(s)
    if use_margin:
        keep = s - torch.maximum(background[a], background[b]) >= cfg.margin
        a, b = a[keep], b[keep]
    pairs = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], 1).numpy().astype(np.int64)
    return np.unique(pairs, axis=0)  # two listed rows find each other twice
