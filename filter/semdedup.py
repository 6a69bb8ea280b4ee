"""SemDeDup at scale: the embedding level as bucketed tasks over memory-mapped float16 parts.

k-means (``n / cluster_size`` centroids) is trained on a fixed-size sample, each item joins its
nearest ``probes`` clusters, and a task per group of clusters loads only its members and keeps the
pairs whose cosine passes ``threshold`` (and, with ``margin``, beats both items' k-th neighbour
by it). Embeddings stay float16 on disk and in memory; only a cluster's members and one block of
its similarity rows are ever float32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from filter.buckets import Bucketed


def level(parts: Sequence[np.ndarray], cfg, workdir: str) -> Bucketed:
    """The level's tasks over ``parts`` ((n_p, d) float16 unit embeddings, e.g. memmaps) under ``cfg``
    (an EmbeddingDedupeConfig)."""
    n = sum(map(len, parts))
    return Bucketed(parts, workdir, n_buckets=n // cfg.cluster_size, probes=cfg.probes, sample=cfg.sample,
                    task_rows=cfg.task_rows, keys=lambda chunk: [np.asarray(chunk, np.float32)],
                    find_pairs=lambda x: cluster_pairs(x, cfg))


def cluster_pairs(x: np.ndarray, cfg) -> np.ndarray:
    """(p, 2) pairs (i < j) of rows of ``x`` (one cluster's embeddings) that are copies, computed
    ``cfg.block_rows`` similarity rows at a time."""
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
