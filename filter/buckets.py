"""Bucketed pair search with memory bounded per task: the inverted-file (IVF) layout of faiss, cut into tasks.

Comparing every pair of n items is quadratic, and one index over all of them does not fit one
task. So, as an IVF index does, a coarse quantiser sends each item to a few buckets and pairs are
sought only within a bucket. As a dedupe level (:class:`BucketLevel`, filter/dedupe.py's interface):

- ``prepare`` (once): spherical k-means with ``n / bucket size`` centroids, at most ``sample /
  POINTS_PER_CENTROID``, on a fixed-size seeded sample of the rows in the running (training cost
  and memory independent of n; faiss on GPU when one is present), saved as ``centroids.npy`` in
  the level's folder;
- ``map`` (per part): each row's nearest ``probes`` centroids for each of its keys (copies near a
  bucket boundary still meet), computed in chunks from the part's memory-mapped array; a record
  (row, part, index, bucket) per bucket it joins, sent to partition ``bucket % partitions``;
- ``reduce`` (per partition): bucket by bucket, load only that bucket's members from the parts'
  memory-mapped arrays and find the pairs among them. A bucket holding more than ``SPLIT_ABOVE``
  times the records expected of it (past the centroid cap, ~n / cap rows, or a crowded k-means
  cell) is cut the same way first: k-means on its members, each joining its nearest ``probes``
  cells, so a row's search stays ``fanout x bucket size`` wide at any n (fanout: keys x probes).

Memory: a map holds a chunk, a reduce its records and one bucket's members (not the dataset).
"""

from __future__ import annotations

from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa

from filter.dedupe import NO_PAIRS, Level
from pipeline.core.io import atomic_write
from pipeline.core.partition import split

HNSW_ABOVE = 4096  # more centroids than this: assign through an HNSW graph (flat search costs a row O(centroids))
# k-means needs tens of sample rows per centroid (faiss warns below 39): past sample / this centroids, the
# buckets grow with n instead and the reduce cuts them (at the default sample of 262,144: 4,096 centroids)
POINTS_PER_CENTROID = 64
SPLIT_ABOVE = 2  # a bucket with more than this many times its expected records (fanout x bucket size) is cut


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


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)



class BucketLevel(Level):
    """A level whose pairs lie within buckets of a k-means quantiser over ``keys`` of an array kind.

    A subclass names ``kind`` ("embed" | "thumbs"), ``n_keys`` (key vectors per row) and implements
    ``keys(x) -> [(m, d) float32] * n_keys``, ``settings() -> (bucket size, probes, sample)`` and
    ``find_pairs(x) -> (p, 2)`` local pairs among one bucket's rows (in row order)."""

    kind: str
    n_keys = 1
    has_prepare = True
    chunk_rows = 65536

    @property
    def fanout(self) -> float:
        return self.n_keys * self.settings()[1]

    def settings(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def keys(self, x: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def find_pairs(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def _centroids(self) -> str:
        return f"{self.ctx.folder}/centroids.npy"

    def prepare(self) -> None:
        size, _, sample = self.settings()
        counts = [self.ctx.alive(p).num_rows for p in range(self.ctx.parts)]
        chunks, rows = [np.zeros((0, 1), np.float32)], [np.zeros(0, np.int64)]
        for p, picked in enumerate(sample_rows(counts, sample)):
            if len(picked):
                alive = self.ctx.alive(p)
                chunks.append(self.keys(np.asarray(self.ctx.arrays(p, self.kind)[alive["index"].to_numpy()[picked]]))[0])
                rows.append(alive["row"].to_numpy()[picked])
        x = np.concatenate(chunks[1:]) if len(chunks) > 1 else chunks[0]
        x = x[np.argsort(np.concatenate(rows), kind="stable")]  # in input order, whatever the parts: k-means' seeding depends on it
        with atomic_write(self._centroids) as f:
            np.save(f, train(x, min(sum(counts) // size, sample // POINTS_PER_CENTROID)))

    def map(self, part: int, table: pa.Table) -> dict[int, pa.Table]:
        centroids, probes = np.load(self._centroids), self.settings()[1]
        index, array = table["index"].to_numpy(), self.ctx.arrays(part, self.kind)
        step = self.chunk_rows
        bucket, position = memberships(self.nearest((array[index[i : i + step]] for i in range(0, len(index), step)), centroids, probes))
        out = pa.table({"row": table["row"].take(position), "part": table["part"].take(position),
                        "index": pa.array(index[position]), "bucket": pa.array(bucket.astype(np.int32))})
        partition = bucket % self.partitions
        return split(out, partition)

    def nearest(self, chunks: Iterator[np.ndarray], centroids: np.ndarray, probes: int) -> np.ndarray:
        """(rows, n_keys x probes) int32: the nearest ``probes`` centroids of each key of the rows, a chunk of
        rows at a time (only a chunk's keys are ever float32)."""
        out = [np.zeros((0, self.n_keys * min(probes, len(centroids))), np.int32)]
        for chunk in chunks:
            out.append(np.hstack([assign(k, centroids, probes, self.chunk_rows) for k in self.keys(np.asarray(chunk))]))
        return np.concatenate(out)

    def reduce(self, partition: int, table: pa.Table) -> np.ndarray:
        table = table.sort_by([("bucket", "ascending"), ("row", "ascending")])
        row, part, index, bucket = (table[c].to_numpy() for c in ("row", "part", "index", "bucket"))
        found = [NO_PAIRS]
        for lo, hi in groups_of_two_or_more(bucket):
            members = None
            for p in np.unique(part[lo:hi]):  # only this bucket's rows, part by part, placed in row order
                mine = np.flatnonzero(part[lo:hi] == p)
                x = np.asarray(self.ctx.arrays(int(p), self.kind)[index[lo:hi][mine]])
                members = np.empty((hi - lo, *x.shape[1:]), x.dtype) if members is None else members
                members[mine] = x
            found.append(row[lo:hi][self.bucket_pairs(members)])
        return np.concatenate(found).astype(np.int64)

    def bucket_pairs(self, members: np.ndarray) -> np.ndarray:
        """``find_pairs`` over one bucket's members, within cells of a k-means of their own when the
        bucket is too large to search whole (see the module's docstring)."""
        size, probes, sample = self.settings()
        if len(members) <= SPLIT_ABOVE * self.fanout * size:
            return self.find_pairs(members)
        cells, step = int(len(members) * self.fanout // size), self.chunk_rows  # ~size records a cell, as in the uncut regime
        picked = sample_rows([len(members)], max(sample, cells * POINTS_PER_CENTROID))[0]
        centroids = train(self.keys(members[picked])[0], cells)
        cell, position = memberships(self.nearest((members[i : i + step] for i in range(0, len(members), step)), centroids, probes))
        found = [NO_PAIRS]
        for lo, hi in groups_of_two_or_more(cell):
            mine = position[lo:hi]  # ascending: a cell's members in row order, as find_pairs expects
            found.append(mine[self.find_pairs(members[mine])])
        return np.concatenate(found)


def groups_of_two_or_more(sorted_keys: np.ndarray) -> Iterator[tuple[int, int]]:
    """(lo, hi) of each run of equal values in ``sorted_keys`` that holds at least two items."""
    bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
    return ((lo, hi) for lo, hi in zip([0, *bounds], [*bounds, len(sorted_keys)]) if hi - lo >= 2)


def memberships(assigned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) cells per item -> (cell, item) for each distinct (cell, item), sorted by cell, then item."""
    n = max(1, len(assigned))
    key = np.unique(assigned.ravel().astype(np.int64) * n + np.repeat(np.arange(len(assigned)), assigned.shape[1]))
    return key // n, key % n
