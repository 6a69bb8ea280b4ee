"""Dedupe: time and peak memory of embedding dedupe at scale, and recall/precision on the embedded pool.

1. Scale: ``--n`` (default 1,000,000) unit 512-d float16 embeddings (as clip_score stores them)
   drawn around ``n / 50`` topic centres, 1% of them planted near copies (cosine ~0.98), through
   filter.dedupe's ``embedding`` level (SemDeDup: faiss spherical k-means, then in-cluster cosine)
   with ``--threads`` (default 2) faiss/torch threads. Peak memory is the RSS high-water mark
   above the RSS once the embeddings are in memory, sampled every 20 ms (benchmarks.measure.PeakRSS).
2. Quality: the dedupe step (shard phase, then dataset phase: rows, exact, pixel, embedding, as
   configs/data/default.yaml) over the embedded pool's clean rows and planted exact/near
   duplicates; recall = planted copies removed / planted, precision = planted among removed.

The scale part uses configs/data/default.yaml's embedding settings except ``cluster_size`` and
``probes`` (``--cluster-size`` 2000 and ``--probes`` 1 by default: SemDeDup's plain k-means; the
pool's 5000 and 2 suit 10k images, not 1M).

    python -m benchmarks.dedupe [--n 1000000] [--cluster-size 2000] [--probes 1] [--threads 2] [--pool-rows 0] [--skip-pool]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from benchmarks.measure import PeakRSS, stdout_to_stderr
from filter import StepContext
from filter.dedupe import Dedupe, DedupeConfig, Features, normalize_caption, roots
from pipeline.core import config
from pipeline.build_shards import BuildConfig
from pipeline.embedded import load_pool
from pipeline.core.io import read_parquet, write_json, write_parquet
from pipeline.core.log import setup_logging
from pipeline.core.shards import Layout


def synthetic(n: int, dim: int = 512, copies: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float16 unit embeddings and the indices of the planted copies (each copies an earlier item)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), dim), dtype=np.float32)
    emb = np.empty((n, dim), np.float16)
    for start in range(0, n, 65536):  # in chunks, so float32 scratch stays small
        stop = min(n, start + 65536)
        x = centres[rng.integers(0, len(centres), stop - start)] + 1.2 * rng.standard_normal((stop - start, dim), dtype=np.float32)
        emb[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    planted = np.sort(rng.choice(np.arange(1, n), int(n * copies), replace=False))
    source = (planted * rng.random(len(planted))).astype(np.int64)  # an earlier item
    x = emb[source].astype(np.float32) + 0.015 * rng.standard_normal((len(planted), dim), dtype=np.float32)
    emb[planted] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return emb, planted


def scale(n: int, cfg: DedupeConfig) -> dict:
    emb, planted = synthetic(n)
    features = Features(np.arange(n), *(None,) * 6, emb)
    with PeakRSS(interval=0.02) as peak:
        start = time.perf_counter()
        root = roots("embedding", features, cfg)
        seconds = time.perf_counter() - start
    removed = np.flatnonzero(root != np.arange(n))
    hits = np.intersect1d(removed, planted).size
    return {"n": n, "dim": emb.shape[1], "seconds": round(seconds, 1), "peak_rss_above_baseline_gib": round(peak.added_gib, 3),
            "planted_copies": len(planted), "removed": len(removed), "recall": round(hits / max(1, len(planted)), 4),
            "precision": round(hits / max(1, len(removed)), 4), "goal": "seconds < 120, peak_rss_above_baseline_gib < 4"}


def pool_quality(cfg: DedupeConfig, rows: int) -> dict:
    """The dedupe step over the pool's clean rows and planted copies, as the build runs it."""
    pool = load_pool(with_content=True)
    pool = pool.filter(pc.is_in(pool["fault"], pa.array(["", "near_dup", "exact_dup"])))
    pool = pool.slice(0, rows) if rows else pool
    ids = set(pool["id"].to_pylist())
    samples = [{"row": r["id"], "uid": f"{r['id']:032x}", "image": r["content"], "caption": r["caption"], "meta": {}}
               for r in pool.select(["id", "content", "caption"]).to_pylist()]
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(tmp)
        write_json(layout.input_index, {"parts": 1, "part_size": len(samples)})
        step = Dedupe(cfg, StepContext(layout, "dedupe"))
        start = time.perf_counter()
        table = step.shard(0, iter(samples))
        write_parquet(layout.step("dedupe", 0), table)
        for phase in step.phases():  # the build's dataset-wide phases, their tasks in this process
            for task in range(phase.tasks):
                phase.run(task)
        decided = read_parquet(layout.decisions("dedupe", 0))
        reasons = np.full(table.num_rows, "", dtype=object)
        reasons[pc.index_in(decided["row"], value_set=table["row"]).to_numpy()] = decided["reason"].to_pylist()
        seconds = time.perf_counter() - start
    fault, dup_of = pool["fault"].to_numpy(zero_copy_only=False), pool["dup_of"].to_numpy()
    planted = np.isin(fault, ["near_dup", "exact_dup"]) & np.isin(dup_of, list(ids))  # copies whose original is here
    removed = reasons != ""
    return {"rows": pool.num_rows, "planted_copies": int(planted.sum()), "removed": int(removed.sum()),
            "recall": round(float((removed & planted).sum() / max(1, planted.sum())), 4),
            "precision": round(float((removed & planted).sum() / max(1, removed.sum())), 4),
            "removed_by": {k: int(v) for k, v in zip(*np.unique(reasons[removed], return_counts=True))},
            "seconds": round(seconds, 1), "levels": cfg.levels, "embedder": cfg.embedding.embedder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--cluster-size", type=int, default=2000)
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pool-rows", type=int, default=0, help="0: every clean and planted-copy row")
    parser.add_argument("--skip-pool", action="store_true")
    args = parser.parse_args()
    setup_logging("WARNING")
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    cfg = config.load(BuildConfig, config.CONFIG_ROOT / "data" / "default.yaml").dedupe
    at_scale = dataclasses.replace(cfg, embedding=dataclasses.replace(cfg.embedding, cluster_size=args.cluster_size, probes=args.probes))
    with stdout_to_stderr():
        result = {"scale": scale(args.n, at_scale), "threads": args.threads, "embedding_config": config.to_dict(at_scale.embedding)}
        if not args.skip_pool:
            result["pool"] = pool_quality(cfg, args.pool_rows)
    print(json.dumps({**result, "loadavg": os.getloadavg(), "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
