"""Dedupe's heavy levels at scale, as partitioned tasks: the pixel level and the embedding level (SemDeDup).

Synthesises per-part inputs for ``--n`` rows in parts of ``--part-rows`` (.npy files on disk, read
by the tasks as memmaps), with planted copies of earlier rows (anywhere in the data, so across parts):

- ``embedding``: 512-d float16 unit embeddings around ``n / 50`` topic centres; 1% planted near
  copies (cosine ~0.95); through configs/data/default.yaml's threshold and margin.
- ``pixel``: 28x28 grey thumbnails (blurred random fields, then blurred as filter.near_dup.thumbnail
  does); 1% planted copies, in turn re-encoded as JPEG (quality 75), shifted by a pixel, mirrored.

Each level runs as the dedupe step's tasks (filter/dedupe.py's Level: prepare = k-means on a
fixed-size sample, map per part = assignment, reduce per partition = pairs bucket by bucket,
merge = connected components) on a process pool of ``--workers``, a fresh process per task. Per level:
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
import pyarrow as pa
import scipy.ndimage
from PIL import Image

from benchmarks.measure import stdout_to_stderr
from filter.dedupe import LEVELS, NO_PAIRS, DedupeConfig, LevelContext
from pipeline.build_shards import BuildConfig
from pipeline.core import config
from pipeline.core.partition import components, read_partition, write_partitioned


def _parts(n: int, part_rows: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + part_rows)) for lo in range(0, n, part_rows)]


def _plant(n: int, rate: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Sorted copy rows and, for each, the earlier row it copies (itself never a copy)."""
    copies = np.sort(rng.choice(np.arange(1, n), int(n * rate), replace=False))
    originals = np.setdiff1d(np.arange(n), copies)
    source = originals[(np.searchsorted(originals, copies) * rng.random(len(copies))).astype(np.int64)]
    return copies, source


def _write_parts(root, n: int, part_rows: int, make, copies, source, vary, finish=None) -> list[str]:
    """Parts (files ``root/{part}.npy``, or ``root(part)``) from ``make(rng, rows)``; then each copy row
    overwritten by ``vary(rng, source rows, copy rows)``; then each part through ``finish``."""
    paths = []
    for p, (lo, hi) in enumerate(_parts(n, part_rows)):
        paths.append(root(p) if callable(root) else os.path.join(root, f"{p:05d}.npy"))
        os.makedirs(os.path.dirname(paths[-1]), exist_ok=True)
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


def synthetic_embeddings(root, n: int, part_rows: int, dim: int = 512, rate: float = 0.01, seed: int = 0,
                         noise: float = 0.015, planted: tuple | None = None):
    """Part files of (rows, dim) float16 unit embeddings; the planted (copies, sources), drawn here
    unless given. A copy is its source plus ``noise`` per dimension: cosine ~0.95 at 0.015, ~0.975 at 0.01."""
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
        return unit(x.astype(np.float32) + noise * rng.standard_normal(x.shape, dtype=np.float32))

    copies, source = planted or _plant(n, rate, np.random.default_rng(seed + 1))
    return _write_parts(root, n, part_rows, make, copies, source, vary), copies, source


def _blur(x: np.ndarray) -> np.ndarray:
    return scipy.ndimage.gaussian_filter(x.astype(np.float32), (0, 1, 1)).round().clip(0, 255).astype(np.uint8)


def synthetic_thumbs(root, n: int, part_rows: int, size: int = 28, rate: float = 0.01, seed: int = 0, planted: tuple | None = None):
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

    copies, source = planted or _plant(n, rate, np.random.default_rng(seed + 1))
    return _write_parts(root, n, part_rows, raw, copies, source, vary, finish=_blur), copies, source


SYNTH = {"embedding": synthetic_embeddings, "pixel": synthetic_thumbs}
KIND = {"embedding": "embed", "pixel": "thumbs"}


def level_tasks(level: str, paths: list[str], part_rows: int, cfg: DedupeConfig, folder: str):
    """The level over the part files, as the dedupe step builds it (alive = every row; row = global position)."""
    def alive(p: int) -> pa.Table:
        rows = len(np.load(paths[p], mmap_mode="r"))
        return pa.table({"row": np.arange(rows) + p * part_rows, "part": np.full(rows, p), "index": np.arange(rows)})

    arrays = lambda p, kind: np.load(paths[p], mmap_mode="r")
    return LEVELS.build(level, LevelContext(cfg, len(paths), part_rows * len(paths), folder, arrays, alive))


def _task(args) -> tuple[float, float]:
    """One task in a fresh process, as the framework runs it: (peak RSS GiB, CPU seconds)."""
    level, paths, part_rows, cfg, folder, phase, i = args
    lvl = level_tasks(level, paths, part_rows, cfg, folder)
    if phase == "prepare":
        lvl.prepare()
    elif phase == "map":
        write_partitioned(f"{folder}/map/{i:06d}.arrow", lvl.map(i, lvl.ctx.alive(i)), lvl.partitions)
    else:
        table = read_partition([f"{folder}/map/{p:06d}.arrow" for p in range(len(paths))], i)
        np.save(f"{folder}/pairs-{i:06d}.npy", NO_PAIRS if table is None else lvl.reduce(i, table))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime


def run(level: str, n: int, part_rows: int, cfg: DedupeConfig, workers: int, root: str) -> dict:
    """Synthesise, run the level's tasks (prepare, map per part, reduce per partition, merge), score it."""
    start = time.perf_counter()
    os.makedirs(os.path.join(root, "parts"))
    paths, copies, source = SYNTH[level](os.path.join(root, "parts"), n, part_rows)
    synth_s = time.perf_counter() - start
    folder = os.path.join(root, "level")
    partitions = level_tasks(level, paths, part_rows, cfg, folder).partitions
    phases, stats = {}, []
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=1) as pool:
        for phase, count in (("prepare", 1), ("map", len(paths)), ("reduce", partitions)):
            t = time.perf_counter()
            got = pool.map(_task, [(level, paths, part_rows, cfg, folder, phase, i) for i in range(count)], chunksize=1)
            stats += got
            phases[phase] = {"tasks": len(got), "seconds": round(time.perf_counter() - t, 1),
                             "max_rss_gib": round(max(r for r, _ in got), 3), "cpu_s": round(sum(c for _, c in got), 1)}
    t = time.perf_counter()
    nodes, group_root = components(np.concatenate([np.load(f"{folder}/pairs-{i:06d}.npy") for i in range(partitions)]))
    root_of = np.arange(n)
    root_of[nodes] = group_root
    phases["merge"] = {"tasks": 1, "seconds": round(time.perf_counter() - t, 1)}
    wall = time.perf_counter() - start
    truth = np.arange(n)
    truth[copies] = source  # sources are never copies: a copy's group is its source
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
            "config": config.to_dict(getattr(cfg, level)), "partition_rows": cfg.partition_rows}


def level_config(level: str, partition_rows: int | None = None, **overrides) -> DedupeConfig:
    """configs/data/default.yaml's dedupe settings, with ``overrides`` of the level's section."""
    cfg = config.load(BuildConfig, config.CONFIG_ROOT / "data" / "default.yaml").dedupe
    cfg = dataclasses.replace(cfg, **{level: dataclasses.replace(getattr(cfg, level), **overrides)})
    return dataclasses.replace(cfg, partition_rows=partition_rows) if partition_rows else cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", choices=sorted(SYNTH), required=True)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--part-rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="faiss/torch threads per task")
    parser.add_argument("--partition-rows", type=int, default=None, help="records per reduce task (default: the config's)")
    parser.add_argument("--set", nargs="*", default=[], help="level config overrides, e.g. cluster_size=2000 probes=1")
    parser.add_argument("--tmp", default=None, help="where the parts are written (default: the system temp dir)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    section = getattr(level_config(args.level), args.level)
    overrides = {k: type(getattr(section, k))(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = level_config(args.level, args.partition_rows, **overrides)
    with stdout_to_stderr(), tempfile.TemporaryDirectory(dir=args.tmp) as root:
        result = run(args.level, args.n, args.part_rows, cfg, args.workers, root)
    print(json.dumps({**result, "threads": args.threads, "loadavg": os.getloadavg(), "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
