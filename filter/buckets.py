"""Bucketed pair search with memory bounded per task: the inverted-file (IVF) layout of faiss, cut into tasks.

Comparing every pair of n items is quadratic, and one index over all of them does not fit one
task. So, as an IVF index does, a coarse quantiser sends each item to a few buckets and pairs are
sought only within a bucket:

1. ``train``: spherical k-means on a fixed-size seeded sample (cost and memory independent of n;
   faiss on GPU when one is present), centroids saved as a file;
2. ``assign``: per part, each item's nearest ``probes`` centroids (copies near a bucket boundary
   still meet), in chunks; an HNSW graph over the centroids when there are many, so a row's cost
   grows as log(centroids), not as their number;
3. ``bucket_members``: per part, (bucket, item) sorted by bucket, so a task reads its buckets' slice;
4. ``task_ranges``: consecutive buckets grouped into tasks of at most ``task_rows`` members.

A task then loads only its members (memory-mapped parts), finds the pairs, and the pairs of every
task are merged by connected components (:func:`components`). Item ids are global positions:
the part's offset plus the row within the part.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import faiss
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from pipeline.core.io import atomic_write

HNSW_ABOVE = 4096  # more centroids than this: assign through an HNSW graph (flat search costs a row O(centroids))


def sample_rows(sizes: list[int], size: int, seed: int = 0) -> list[np.ndarray]:
    """Per part, the sorted local rows of a uniform sample of ``size`` items over all parts
    (every row, in order, when there are no more than ``size``)."""
    total = sum(sizes)
    picked = np.arange(total) if total <= size else np.sort(np.random.default_rng(seed).choice(total, size, replace=False))
    bounds = np.cumsum([0, *sizes])
    return [picked[(picked >= lo) & (picked < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def train(sample: np.ndarray, n_centroids: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """(n_centroids, d) float32 unit centroids of spherical k-means over ``sample`` rows."""
    x = np.ascontiguousarray(sample, np.float32)
    if n_centroids <= 1:
        return _unit(x.mean(0, keepdims=True)) if len(x) else np.zeros((1, x.shape[1]), np.float32)
    kmeans = faiss.Kmeans(x.shape[1], n_centroids, niter=niter, seed=seed, spherical=True, gpu=faiss.get_num_gpus() > 0)
    kmeans.train(x)
    return kmeans.centroids


def assign(x: np.ndarray, centroids: np.ndarray, probes: int, chunk_rows: int = 65536) -> np.ndarray:
    """(n, probes) int32: each row's nearest centroids by inner product, ``chunk_rows`` rows at a time
    (``x`` may be a float16 memmap: only a chunk is ever float32)."""
    probes = min(probes, len(centroids))
    out = np.empty((len(x), probes), np.int32)
    if len(centroids) == 1:
        out[:] = 0
        return out
    if len(centroids) > HNSW_ABOVE:
        index = faiss.IndexHNSWFlat(centroids.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, 4 * probes)
    else:
        index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    for start in range(0, len(x), chunk_rows):
        chunk = np.ascontiguousarray(x[start : start + chunk_rows], np.float32)
        out[start : start + len(chunk)] = index.search(chunk, probes)[1]
    return out


def bucket_members(assigned: np.ndarray, n_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """From a part's (n, k) bucket ids: (n_buckets + 1,) offsets and the part's local rows sorted by
    bucket (each row once per bucket, however many of its k columns name it)."""
    rows = np.repeat(np.arange(len(assigned), dtype=np.int64), assigned.shape[1])
    key = np.unique(assigned.ravel().astype(np.int64) * max(1, len(assigned)) + rows)
    bucket = key // max(1, len(assigned))
    return np.searchsorted(bucket, np.arange(n_buckets + 1)), (key % max(1, len(assigned)))


def task_ranges(counts: np.ndarray, task_rows: int) -> list[tuple[int, int]]:
    """Consecutive bucket ranges [lo, hi) of at most ``task_rows`` members each (a bigger bucket alone)."""
    ranges, lo, total = [], 0, 0
    for b, c in enumerate(counts.tolist()):
        if total and total + c > task_rows:
            ranges.append((lo, b))
            lo, total = b, 0
        total += c
    if lo < len(counts):
        ranges.append((lo, len(counts)))
    return ranges


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of ``pairs`` over n items: (n,) the smallest index of each item's group."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    graph = scipy.sparse.coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = scipy.sparse.csgraph.connected_components(graph, directed=False)
    _, first = np.unique(label, return_index=True)  # labels are 0..c-1; the first occurrence is the smallest index
    return first[label].astype(np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Bucketed:
    """One bucketed pair search over parts (arrays or memmaps, items in global order) as resumable
    tasks whose outputs are files in ``workdir``: ``train()``, then ``assign(p)`` for every part, then
    ``pairs(t)`` for every task of ``tasks()``, then ``merge()``. A task whose file exists is done.

    ``keys(chunk)`` gives the vectors an item is bucketed by (several: an item joins the buckets
    of each); ``find_pairs(members)`` gives the (local, local) pairs among a bucket's stacked items."""

    def __init__(self, parts: Sequence[np.ndarray], workdir: str, *, n_buckets: int, probes: int, sample: int,
                 task_rows: int, keys: Callable[[np.ndarray], list[np.ndarray]],
                 find_pairs: Callable[[np.ndarray], np.ndarray], chunk_rows: int = 65536, seed: int = 0):
        self.parts, self.workdir, self.n_buckets = parts, workdir, max(1, n_buckets)
        self.probes, self.sample, self.task_rows, self.chunk_rows, self.seed = probes, sample, task_rows, chunk_rows, seed
        self.keys, self.find_pairs = keys, find_pairs
        self.offsets = np.cumsum([0, *map(len, parts)])
        os.makedirs(workdir, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def train(self) -> None:
        if os.path.exists(self._path("centroids.npy")):
            return
        rows = sample_rows([len(p) for p in self.parts], self.sample, self.seed)
        sample = np.concatenate([self.keys(part[r])[0] for part, r in zip(self.parts, rows) if len(r)])
        _save(self._path("centroids.npy"), train(sample, self.n_buckets, self.seed))

    def assign(self, p: int) -> None:
        if os.path.exists(self._path(f"members-{p}.rows.npy")):
            return
        centroids, part = np.load(self._path("centroids.npy")), self.parts[p]
        chunks = []
        for start in range(0, len(part), self.chunk_rows):
            keys = self.keys(part[start : start + self.chunk_rows])
            chunks.append(np.hstack([assign(k, centroids, self.probes, self.chunk_rows) for k in keys]))
        assigned = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.int32)
        offsets, rows = bucket_members(assigned, len(centroids))
        _save(self._path(f"members-{p}.offsets.npy"), offsets)
        _save(self._path(f"members-{p}.rows.npy"), rows)  # the done marker: written last

    def _members(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        return np.load(self._path(f"members-{p}.offsets.npy")), np.load(self._path(f"members-{p}.rows.npy"), mmap_mode="r")

    def tasks(self) -> np.ndarray:
        """(tasks, 2) bucket ranges, computed once from every part's bucket sizes."""
        path = self._path("tasks.npy")
        if not os.path.exists(path):
            counts = sum(np.diff(self._members(p)[0]) for p in range(len(self.parts)))
            _save(path, np.array(task_ranges(np.asarray(counts), self.task_rows), np.int64).reshape(-1, 2))
        return np.load(path)

    def pairs(self, t: int) -> None:
        path = self._path(f"pairs-{t}.npy")
        if os.path.exists(path):
            return
        lo, hi = self.tasks()[t]
        members, found = [self._members(p) for p in range(len(self.parts))], []
        for b in range(lo, hi):
            ids, items = [], []
            for p, (offsets, part_rows) in enumerate(members):
                rows = np.asarray(part_rows[offsets[b] : offsets[b + 1]])
                ids.append(rows + self.offsets[p])
                items.append(self.parts[p][rows])
            ids = np.concatenate(ids)
            if len(ids) > 1:
                found.append(ids[self.find_pairs(np.concatenate(items))])
        _save(path, np.concatenate(found) if found else np.zeros((0, 2), np.int64))

    def merge(self) -> np.ndarray:
        """(n,) each item's group root: the first item of its group."""
        pairs = [np.load(self._path(f"pairs-{t}.npy")) for t in range(len(self.tasks()))]
        return components(int(self.offsets[-1]), np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64))

    def run(self) -> np.ndarray:
        """Every task in order, in this process."""
        self.train()
        for p in range(len(self.parts)):
            self.assign(p)
        for t in range(len(self.tasks())):
            self.pairs(t)
        return self.merge()


def _save(path: str, array: np.ndarray) -> None:
    with atomic_write(path) as f:  # a killed task leaves no file that looks done
        np.save(f, array)
