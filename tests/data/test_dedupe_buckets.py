"""The bucketed dedupe levels (filter/buckets.py: embedding = SemDeDup, pixel) against exact all-pairs search.

Synthetic inputs with planted copies: 64-d unit embeddings around topic centres (copies at cosine
~0.99), and 28x28 thumbnails from benchmarks/dedupe_scale.py (JPEG re-encoded, shifted, mirrored
copies). One bucket must give exactly the exact search's pairs; many buckets (with two probes) at
least 95% of them and nothing the thresholds reject, also when the centroids are capped and the
reduce cuts its one bucket; and the embedding level run through the dedupe step's phases over 3
parts and several reduce tasks, with one reduce task SIGKILLed mid-write and redone, gives the
decisions of the in-memory run.
"""

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.dedupe_scale import synthetic_thumbs
from filter import StepContext
from filter.buckets import assign, sample_rows, train
from filter.dedupe import DedupeConfig, EmbeddingDedupeConfig, Dedupe, Features, roots
from filter.near_dup import PixelDedupeConfig, groups, matching_pairs
from filter.pixel_dedupe import Pixel
from filter.semdedup import Embedding, cluster_pairs
from pipeline.core.io import write_json, write_parquet
from pipeline.core.shards import Layout

EMB = EmbeddingDedupeConfig(threshold=0.9, margin=0.1, background_k=5, cluster_size=10**9, probes=2, block_rows=97)


def embeddings(n: int = 1500, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n // 30, dim))[rng.integers(0, n // 30, n)] + 0.8 * rng.standard_normal((n, dim))
    copies = rng.choice(np.arange(1, n), n // 20, replace=False)
    x[copies] = x[(copies * rng.random(len(copies))).astype(int)] + 0.02 * rng.standard_normal((len(copies), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def exact_pairs(x: np.ndarray, c: EmbeddingDedupeConfig) -> set:
    """Every pair over all rows at once: today's one-matrix search."""
    sim = torch.from_numpy(x.astype(np.float32)) @ torch.from_numpy(x.astype(np.float32)).T
    sim.fill_diagonal_(-1.0)
    a, b = torch.nonzero(torch.triu(sim >= c.threshold, diagonal=1), as_tuple=True)
    background = sim.topk(c.background_k, dim=1).values[:, -1]
    keep = sim[a, b] - torch.maximum(background[a], background[b]) >= c.margin
    return set(zip(a[keep].tolist(), b[keep].tolist()))


def features(thumbs=None, emb=None, rows=None) -> Features:
    n = len(thumbs if emb is None else emb)
    ids = np.arange(n).astype(str)
    rows = np.arange(n) * 3 + 7 if rows is None else rows  # rows need not be positions
    return Features(rows, ids, ids, ids, None, None, thumbs, emb)


def test_blocked_cluster_pairs_equal_the_one_matrix_search():
    x = embeddings()
    assert set(map(tuple, cluster_pairs(x, EMB).tolist())) == exact_pairs(x, EMB) != set()


def test_embedding_level_one_cluster_is_exact_and_many_keep_recall():
    x = embeddings()
    exact = groups(len(x), np.array(sorted(exact_pairs(x, EMB))))
    cfg = DedupeConfig(levels=["embedding"], embedding=EMB)
    assert np.array_equal(roots("embedding", features(emb=x), cfg), exact)
    many = dataclasses.replace(cfg, embedding=dataclasses.replace(EMB, cluster_size=100, sample=1000))  # 15 clusters from 1000 rows
    root = roots("embedding", features(emb=x), many)
    dropped, should = root != np.arange(len(x)), exact != np.arange(len(x))
    assert (dropped & should).sum() >= 0.95 * should.sum()
    sim = (x[dropped].astype(np.float32) * x[root[dropped]].astype(np.float32)).sum(1)
    assert (sim >= EMB.threshold - 1e-3).all()  # a pair the threshold rejects is never merged (direct pairs: groups are small)


def test_pixel_level_buckets_keep_recall_of_planted_copies(tmp_path):
    (path,), copies, source = synthetic_thumbs(str(tmp_path), 1000, 1000, rate=0.05)
    thumbs = np.load(path)
    cfg = PixelDedupeConfig(size=28, max_rms=4.25)
    exact = groups(len(thumbs), matching_pairs(thumbs, thumbs, cfg, exclude_self=True))
    one = DedupeConfig(levels=["pixel"], pixel=cfg)
    assert np.array_equal(roots("pixel", features(thumbs=thumbs), one), exact)
    many = dataclasses.replace(one, pixel=dataclasses.replace(cfg, bucket_size=100, probes=2))  # 10 buckets
    root = roots("pixel", features(thumbs=thumbs), many)
    found = root[copies] == root[source]
    assert found.mean() >= 0.95 and (root[exact == np.arange(len(thumbs))] == np.flatnonzero(exact == np.arange(len(thumbs)))).all()


def test_shifted_copies_keep_their_bucket_among_many(tmp_path):
    """One-pixel shifts (an edge column repeated, not a circular shift) move the descriptor the most. With
    log magnitudes 3.2% of them were lost here (no bucket shared with the original), more as buckets
    multiply: recall fell 0.981 / 0.961 at 1M / 4M rows in benchmarks/curation_scale.py. Square roots keep them."""
    (path,), copies, source = synthetic_thumbs(str(tmp_path), 4000, 4000, rate=0.1)
    cfg = PixelDedupeConfig(size=28, max_rms=4.25, bucket_size=40, probes=2)  # 100 buckets
    root = roots("pixel", features(thumbs=np.load(path)), DedupeConfig(levels=["pixel"], pixel=cfg))
    shifted = copies % 3 == 1  # synthetic_thumbs' kinds by row: re-encoded, shifted, mirrored
    assert (root[copies] == root[source])[shifted].mean() >= 0.99


def searched_widths(monkeypatch) -> list:
    """The member counts of every ``find_pairs`` call of the bucketed levels, recorded as they run."""
    widths = []
    for level in (Embedding, Pixel):
        original = level.find_pairs
        monkeypatch.setattr(level, "find_pairs", lambda self, x, original=original: widths.append(len(x)) or original(self, x))
    return widths


def test_buckets_past_the_centroid_cap_are_cut_and_keep_recall(tmp_path, monkeypatch):
    """A sample of 8 rows, against the 15 centroids that 1500 rows in buckets of 100 ask for (faiss refused
    to train on fewer points than centroids: with the default sample and the embedding level's clusters
    of 5,000, past 1.3 x 10^9 rows), now trains one centroid: the one bucket holds every row, and the
    reduce cuts it into cells of about the bucket size."""
    widths = searched_widths(monkeypatch)
    x = embeddings()
    exact = groups(len(x), np.array(sorted(exact_pairs(x, EMB))))
    capped = DedupeConfig(levels=["embedding"], embedding=dataclasses.replace(EMB, cluster_size=100, sample=8))
    root = roots("embedding", features(emb=x), capped)
    dropped, should = root != np.arange(len(x)), exact != np.arange(len(x))
    assert (dropped & should).sum() >= 0.95 * should.sum() and not (dropped & ~should).any()
    assert len(widths) >= 10 and max(widths) <= 2 * 2 * 100  # 15 cells (each row in its 2 nearest), not 1500 rows at once

    widths.clear()
    (path,), copies, source = synthetic_thumbs(str(tmp_path), 1000, 1000, rate=0.05)
    thumbs = np.load(path)
    pixel = PixelDedupeConfig(size=28, max_rms=4.25, bucket_size=100, probes=2, sample=8)
    root = roots("pixel", features(thumbs=thumbs), DedupeConfig(levels=["pixel"], pixel=pixel))
    assert (root[copies] == root[source]).mean() >= 0.95
    assert len(widths) >= 10 and max(widths) <= 2 * 2 * 2 * 100  # 10 cells (2 orientations x 2 probes), not 1000 at once


def test_sample_is_fixed_size_seeded_and_assignment_is_chunk_blind():
    picked = sample_rows([50, 0, 70], 30)
    assert sum(map(len, picked)) == 30 and [p.tolist() for p in picked] == [p.tolist() for p in sample_rows([50, 0, 70], 30)]
    assert [p.tolist() for p in sample_rows([3, 2], 10)] == [[0, 1, 2], [0, 1]]
    x = embeddings(600)
    centroids = train(x, 6)
    assert np.array_equal(assign(x, centroids, 2, chunk_rows=7), assign(x, centroids, 2))


PARTS, PART_SIZE = 3, 500


def write_input(root, x: np.ndarray) -> Layout:
    layout = Layout(str(root))
    write_json(layout.input_index, {"parts": PARTS, "part_size": PART_SIZE})
    for part in range(PARTS):  # interleaved rows, as the build's parts are
        rows = np.arange(part, len(x), PARTS)
        ids = [f"{r:032x}" for r in rows]
        write_parquet(layout.step("dedupe", part), pa.table(
            {"row": rows, "reason": [""] * len(rows), "uid": ids, "sha256": ids, "caption_norm": ids}))
        np.save(layout.step("dedupe", part, ".embed.npy"), x[rows])
    return layout


def decided(layout: Layout) -> dict:
    tables = [pq.read_table(layout.decisions("dedupe", p)) for p in range(PARTS)]
    return {r: why for t in tables for r, why in zip(t["row"].to_pylist(), t["reason"].to_pylist())}


def test_embedding_level_through_the_step_phases_with_a_reduce_killed_and_redone(tmp_path):
    x = embeddings()
    emb = dataclasses.replace(EMB, cluster_size=150, probes=2)
    cfg = DedupeConfig(levels=["embedding"], partition_rows=750, embedding=emb)
    layout = write_input(tmp_path, x)
    step = Dedupe(cfg, StepContext(layout, "dedupe"))
    phases = step.phases()
    assert [p.tasks for p in phases if p.name == "dedupe/0-embedding/reduce"] == [4]  # 1500 rows x 2 probes / 750
    reduce_at = next(i for i, p in enumerate(phases) if p.name.endswith("/reduce"))
    for phase in phases[:reduce_at]:
        for task in range(phase.tasks):
            phase.run(task)
    kill_on_rename = ("import os, signal, sys, pipeline.core.io as io; "
                      "io.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
                      "from pipeline.build_shards import main; main(sys.argv[1:])")
    sets = [f"dedupe.embedding.{k}={v}" for k, v in dataclasses.asdict(emb).items()]
    command = [sys.executable, "-c", kill_on_rename, "--output", str(layout.root), "--phase", "dedupe/0-embedding/reduce",
               "--task", "0/1", "steps=[dedupe]", "dedupe.levels=[embedding]", "dedupe.partition_rows=750", "log_level=WARNING", *sets]
    killed = subprocess.run(command, env={**os.environ, "PYTHONPATH": os.getcwd()}, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    for phase in Dedupe(cfg, StepContext(layout, "dedupe")).phases():  # again: the killed task redone, the rest skipped
        for task in range(phase.tasks):
            phase.run(task)
    root = roots("embedding", features(emb=x, rows=np.arange(len(x))), cfg)
    expected = {int(i): "semantic_dup" for i in np.flatnonzero(root != np.arange(len(x)))}
    assert decided(layout) == expected and len(expected) > 50
