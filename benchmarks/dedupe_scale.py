"""Dedupe's heavy levels at scale, as partitioned tasks: the pixel level and the embedding level (SemDeDup).

Synthesises per-part inputs for ``--n`` rows in parts of ``--part-rows`` (.npy files on disk, read
by the tasks as memmaps), with planted copies of earlier rows (anywhere in the data, so across parts):

- ``embedding``: 512-d float16 unit embeddings around ``n / 50`` topic centres; 1% planted near
  copies (cosine ~0.95); through configs/data/default.yaml's threshold and margin.
- ``pixel``: 28x28 grey thumbnails (blurred random fields, then blurred as filter.near_dup.thumbnail
  does); 1% planted copies, in turn re-encoded as JPEG (quality 75), shifted by a pixel, mirrored.

Each level runs as its task graph (train once on a fixed-size sample, assign per part, pairs per
group of buckets, merge) on a process pool of ``--workers``, a fresh process per task. Per level:
wall time, the largest task's peak RSS (ru_maxrss, the imported libraries included), CPU seconds
per row over all tasks, recall of the planted copies (removed, and joined to the row they copy)
and the false-positive rate (rows removed though they copy nothing in their group, per row).

    python -m benchmarks.dedupe_scale --level embedding --n 1000000 [--part-rows 100000] [--workers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing
import os
import resource
import tempfile
import time

import numpy as np
import scipy.ndimage
from PIL import Image

from benchmarks.measure import stdout_to_stderr
from filter import near_dup, semdedup
from filter.buckets import components
from pipeline.build_shards import BuildConfig
from pipeline.core import config


def _parts(n: int, part_rows: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + part_rows)) for lo in range(0, n, part_rows)]


def _plant(n: int, rate: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Sorted copy rows and, for each, the earlier row it copies (itself never a copy)."""
    copies = np.sort(rng.choice(np.arange(1, n), int(n * rate), replace=False))
    originals = np.setdiff1d(np.arange(n), copies)
    source = originals[(np.searchsorted(originals, copies) * rng.random(len(copies))).astype(np.int64)]
    return copies, source


def _write_parts(root: str, n: int, part_rows: int, make, copies, source, vary, finish=None) -> list[str]:
    """Parts from ``make(rng, rows)``; then each copy row overwritten by ``vary(rng, source rows, copy rows)``;
    then each part through ``finish``."""
    paths = []
    for p, (lo, hi) in enumerate(_parts(n, part_rows)):
        paths.append(os.path.join(root, f"{p:05d}.npy"))
        np.save(paths[-1], make(np.random.default_rng([1, p]), hi - lo))
    parts = [np.load(path, mmap_mode="r+") for path in paths]
    at = lambda rows: [parts[r // part_rows][r % part_rows] for r in rows]
    rng = np.random.default_rng(2)
    for start in range(0, len(copies), 65536):
        c, s = copies[start : start + 65536], source[start : start + 65536]
        for row, value in zip(c, vary(rng, np.stack(at(s)), c)):
            parts[row // part_rows][row % part_rows] = value
    for part in parts:
        if finish:
            part[:] = finish(part)
        part.flush()
    return paths


def synthetic_embeddings(root: str, n: int, part_rows: int, dim: int = 512, rate: float = 0.01, seed: int = 0):
    """Part files of (rows, dim) float16 unit embeddings; the planted (copies, sources)."""
    centres = np.random.default_rng(seed).standard_normal((max(1, n // 50), dim), dtype=np.float32)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

    def make(rng, rows):
        out = np.empty((rows, dim), np.float16)
        for i in range(0, rows, 65536):
            m = min(rows, i + 65536) - i
            out[i : i + m] = unit(centres[rng.integers(0, len(centres), m)] + 1.2 * rng.standard_normal((m, dim), dtype=np.float32))
        return out

    def vary(rng, x, rows):
        return unit(x.astype(np.float32) + 0.015 * rng.standard_normal(x.shape, dtype=np.float32))

    copies, source = _plant(n, rate, np.random.default_rng(seed + 1))
    return _write_parts(root, n, part_rows, make, copies, source, vary), copies, source


def _blur(x: np.ndarray) -> np.ndarray:
    return scipy.ndimage.gaussian_filter(x.astype(np.float32), (0, 1, 1)).round().clip(0, 255).astype(np.uint8)


def synthetic_thumbs(root: str, n: int, part_rows: int, size: int = 28, rate: float = 0.01, seed: int = 0):
    """Part files of (rows, size, size) uint8 thumbnails, blurred after the copies are made from the
    originals (as thumbnail() blurs every image it reads); the planted (copies, sources)."""
    def raw(rng, rows):
        x = scipy.ndimage.gaussian_filter(rng.standard_normal((rows, size, size), dtype=np.float32), (0, 2.5, 2.5))
        x = (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
        return np.clip(128 + 50 * x, 0, 255).astype(np.uint8)

    def vary(rng, x, rows):
        out = x.copy()
        for i, kind in enumerate(rows % 3):
            if kind == 0:  # re-encoded
                data = io.BytesIO()
                Image.fromarray(x[i]).save(data, "JPEG", quality=75)
                out[i] = np.asarray(Image.open(data))
            elif kind == 1:  # shifted a pixel right, the edge column repeated
                out[i, :, 1:], out[i, :, 0] = x[i, :, :-1], x[i, :, 0]
            else:
                out[i] = x[i, :, ::-1]
        return out

    copies, source = _plant(n, rate, np.random.default_rng(seed + 1))
    return _write_parts(root, n, part_rows, raw, copies, source, vary, finish=_blur), copies, source


LEVELS = {"embedding": (synthetic_embeddings, semdedup.level, "embedding"), "pixel": (synthetic_thumbs, near_dup.level, "pixel")}


def _task(args) -> tuple[float, float]:
    """One task in a fresh process: (peak RSS GiB, CPU seconds)."""
    level, paths, cfg, workdir, phase, i = args
    graph = LEVELS[level][1]([np.load(p, mmap_mode="r") for p in paths], cfg, workdir)
    getattr(graph, phase)(*([] if i is None else [i]))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime


def run(level: str, n: int, part_rows: int, cfg, workers: int, root: str) -> dict:
    """Synthesise, run the level's task graph, score it."""
    start = time.perf_counter()
    os.makedirs(os.path.join(root, "parts"))
    paths, copies, source = LEVELS[level][0](os.path.join(root, "parts"), n, part_rows)
    synth_s = time.perf_counter() - start
    workdir = os.path.join(root, "work")
    graph = LEVELS[level][1]([np.load(p, mmap_mode="r") for p in paths], cfg, workdir)
    phases, stats = {}, []
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=1) as pool:
        for phase, count in (("train", None), ("assign", len(paths)), ("pairs", -1)):
            count = len(graph.tasks()) if count == -1 else count
            t = time.perf_counter()
            args = [(level, paths, cfg, workdir, phase, i) for i in ([None] if count is None else range(count))]
            got = pool.map(_task, args, chunksize=1)
            stats += got
            phases[phase] = {"tasks": len(got), "seconds": round(time.perf_counter() - t, 1),
                             "max_rss_gib": round(max(r for r, _ in got), 3), "cpu_s": round(sum(c for _, c in got), 1)}
    t = time.perf_counter()
    root_of = graph.merge()
    phases["merge"] = {"tasks": 1, "seconds": round(time.perf_counter() - t, 1)}
    wall = time.perf_counter() - start
    truth = components(n, np.stack([copies, source], 1))
    removed = np.flatnonzero(root_of != np.arange(n))
    right = truth[removed] == truth[root_of[removed]]
    is_copy = np.zeros(n, bool)
    is_copy[copies] = True
    return {"level": level, "n": n, "parts": len(paths), "part_rows": part_rows, "workers": workers,
            "wall_s": round(wall, 1), "synthesis_s": round(synth_s, 1),
            "largest_task_rss_gib": max(p.get("max_rss_gib", 0) for p in phases.values()),
            "cpu_s_per_row": sum(c for _, c in stats) / n, "phases": phases,
            "planted_copies": len(copies), "removed": len(removed),
            "recall": round(float(is_copy[removed[right]].sum() / len(copies)), 4),
            "false_positive_rate": float((~right).sum() / n),
            "config": config.to_dict(cfg)}


def level_config(level: str, **overrides):
    """configs/data/default.yaml's settings for the level, with ``overrides``."""
    cfg = getattr(config.load(BuildConfig, config.CONFIG_ROOT / "data" / "default.yaml").dedupe, LEVELS[level][2])
    return dataclasses.replace(cfg, **overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", choices=sorted(LEVELS), required=True)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--part-rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="faiss/torch threads per task")
    parser.add_argument("--set", nargs="*", default=[], help="level config overrides, e.g. cluster_size=2000 probes=1")
    parser.add_argument("--tmp", default=None, help="where the parts are written (default: the system temp dir)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    overrides = {k: type(getattr(level_config(args.level), k))(v) for k, v in (s.split("=", 1) for s in args.set)}
    with stdout_to_stderr(), tempfile.TemporaryDirectory(dir=args.tmp) as root:
        result = run(args.level, args.n, args.part_rows, level_config(args.level, **overrides), args.workers, root)
    print(json.dumps({**result, "threads": args.threads, "loadavg": os.getloadavg(), "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
