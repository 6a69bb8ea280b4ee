"""The dataset-wide phases at scale: synthetic per-part outputs for N rows, no download.

Writes what the shard phases would have left for ``--rows`` rows in parts of ``--part-size``
(input and download tables, a small tar per part, the clip_score and dedupe steps' tables with
uids, sha256, scores and pHashes, planted copies at known rates), then runs the dataset phases
of clip_score (top fraction), dedupe (``--levels``) and reshard through the local executor, one
fresh process per task (so each task's peak RSS is its own). Prints one JSON object: per phase
group, wall seconds, tasks, the peak RSS of the largest task, CPU-seconds per row; per level,
the recall of its planted copies and the false-positive rate (distinct rows dropped).

    python -m benchmarks.curation_scale --rows 1000000 [--part-size 50000] [--levels rows,exact,phash] [--workers 2]

A level plugs in a synthesiser with ``@SYNTH.register(name)``: ``fn(rng, columns, originals, copies,
layout, parts) -> None`` makes ``copies`` rows copies of ``originals`` rows (arrays of row
positions, originals earlier in input order) in ``columns`` (the dedupe step's per-row columns as
numpy arrays) and may write per-part arrays (thumbnails, embeddings) beside the part tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa

from benchmarks import dedupe_scale
from pipeline import build_shards
from pipeline.core import config
from pipeline.core.executors import Local
from pipeline.core.io import read_parquet, write_json, write_parquet
from pipeline.core.registry import Registry
from pipeline.core.shards import Layout, write_tar

SYNTH: Registry = Registry("benchmark level")
REASONS = {"rows": "duplicate_row", "exact": "exact_dup", "phash": "near_dup", "caption": "caption_dup",
           "pixel": "near_dup", "embedding": "semantic_dup"}


@SYNTH.register("rows")
def _rows(rng, columns, originals, copies, layout, parts):
    columns["uid"][copies] = columns["uid"][originals]  # the same url and caption listed again


@SYNTH.register("exact")
def _exact(rng, columns, originals, copies, layout, parts):
    for key in ("sha256", "phash", "phash_mirror"):  # the same bytes: the same hashes
        columns[key][copies] = columns[key][originals]


@SYNTH.register("phash")
def _phash(rng, columns, originals, copies, layout, parts):
    flips = np.zeros(len(copies), np.uint64)
    for _ in range(3):  # re-encoded: up to 3 of 64 bits differ
        flips |= np.where(rng.random(len(copies)) < 0.7, np.uint64(1) << rng.integers(0, 64, len(copies)).astype(np.uint64), 0).astype(np.uint64)
    columns["phash"][copies] = columns["phash"][originals] ^ flips
    columns["phash_mirror"][copies] = columns["phash_mirror"][originals] ^ flips


@SYNTH.register("pixel")
def _pixel(rng, columns, originals, copies, layout, parts):
    rows = len(columns["uid"])  # thumbnails with re-encoded, shifted and mirrored copies (benchmarks/dedupe_scale.py)
    dedupe_scale.synthetic_thumbs(lambda p: layout.step("dedupe", p, ".thumbs.npy"), rows, -(-rows // parts), planted=(copies, originals))


@SYNTH.register("embedding")
def _embedding(rng, columns, originals, copies, layout, parts):
    rows = len(columns["uid"])  # 512-d float16, copies at cosine ~0.975 (configs/data/default.yaml: threshold 0.85, margin 0.23)
    dedupe_scale.synthetic_embeddings(lambda p: layout.step("dedupe", p, ".embed.npy"), rows, -(-rows // parts), noise=0.01,
                                      planted=(copies, originals))


def digests(rng, n: int, nbytes: int) -> np.ndarray:
    return np.frombuffer(rng.bytes(n * nbytes), np.uint8).reshape(n, nbytes).copy()


def to_hex(digests: np.ndarray) -> pa.Array:
    """(n, k) uint8 -> n hex strings, vectorised."""
    alphabet = np.frombuffer(b"0123456789abcdef", np.uint8)
    chars = np.stack([alphabet[digests >> 4], alphabet[digests & 15]], 2).reshape(len(digests), -1)
    width = chars.shape[1]
    offsets = np.arange(len(digests) + 1, dtype=np.int32) * width
    return pa.StringArray.from_buffers(len(digests), pa.py_buffer(offsets.tobytes()), pa.py_buffer(chars.tobytes()))


def synthesise(root: str, rows: int, part_size: int, levels: list[str], rate: float, seed: int = 0, tars: bool = True) -> dict:
    """Write the layout; return the planted copies per level (row arrays)."""
    rng, layout = np.random.default_rng(seed), Layout(root)
    parts = -(-rows // part_size)
    write_json(layout.input_index, {"parts": parts, "part_size": part_size})
    columns = {"uid": digests(rng, rows, 16), "sha256": digests(rng, rows, 32),
               "phash": rng.integers(0, 2**63, rows, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, rows, dtype=np.uint64),
               "phash_mirror": rng.integers(0, 2**63, rows, dtype=np.uint64)}
    copies_left = rng.permutation(np.arange(rows // 2, rows))  # copies in the second half, originals anywhere before
    planted = {}
    for k, level in enumerate(levels):
        copies = np.sort(copies_left[k * int(rate * rows) : (k + 1) * int(rate * rows)])
        originals = rng.integers(0, rows // 2, len(copies))
        SYNTH.get(level)(rng, columns, originals, copies, layout, parts)
        planted[level] = copies
    scores = rng.normal(0.3, 0.05, rows).astype(np.float32)
    uid = to_hex(columns["uid"])
    for part in range(parts):
        lo, hi = part * part_size, min(rows, (part + 1) * part_size)
        row = np.arange(lo, hi, dtype=np.int64)
        n = hi - lo
        blank = pa.array([""] * n, pa.string())
        write_parquet(layout.input_part(part), pa.table({"row": row, "uid": uid[lo:hi], "url": blank, "caption": blank,
                                                         "reject": blank, "fetch_url": blank}))
        write_parquet(layout.download(part, ".parquet"), pa.table({"row": row, "status": pa.array(["success"] * n), "error_message": pa.nulls(n, pa.string())}))
        write_parquet(layout.step("clip_score", part), pa.table({"row": row, "reason": blank, "clip_score": scores[lo:hi]}))
        write_parquet(layout.step("dedupe", part), pa.table({
            "row": row, "reason": blank, "uid": uid[lo:hi], "sha256": to_hex(columns["sha256"][lo:hi]), "caption_norm": blank,
            "phash": columns["phash"][lo:hi], "phash_mirror": columns["phash_mirror"][lo:hi]}))
        if not tars:
            continue
        uids = uid[lo:hi].to_pylist()
        write_tar(layout.download(part, ".tar"), ((f"{i:09d}.{ext}", data) for i, u in zip(row.tolist(), uids) for ext, data in
                                                   (("jpg", b"\xff\xd8"), ("txt", b""), ("json", b'{"row": %d, "uid": "%s"}' % (i, u.encode())))))
    return planted


def _usage(tasks: list[dict]) -> dict:
    return {"tasks": len(tasks), "peak_task_rss_mib": round(max(t["max_rss_mib"] for t in tasks), 1),
            "cpu_s": round(sum(t["cpu_s"] for t in tasks), 1)}


def summarise(usage: list[dict], rows: int) -> dict:
    """Per phase group (a step's phases, a dedupe level's): wall, tasks, largest task's RSS, CPU per row;
    and per phase, to tell which of a group's phases grows with the pool."""
    groups = defaultdict(list)
    for phase in usage:
        name = phase["phase"]
        key = "/".join(name.split("/")[:2]) if name.startswith("dedupe/") and name != "dedupe/decide" else name.split("/")[0]
        groups[key].append(phase)
    out = {}
    for key, phases in groups.items():
        group = _usage([t for p in phases for t in p["usage"]])
        out[key] = {"wall_s": round(sum(p["wall_s"] for p in phases), 1), **group,
                    "cpu_us_per_row": round(1e6 * group["cpu_s"] / rows, 2),
                    "phases": {p["phase"].split("/")[-1]: _usage(p["usage"]) for p in phases}}
    return out


def accuracy(layout: Layout, parts: int, rows: int, planted: dict) -> dict:
    reasons = np.full(rows, "", dtype=object)
    for part in range(parts):
        table = read_parquet(layout.decisions("dedupe", part))
        reasons[table["row"].to_numpy()] = table["reason"].to_pylist()
    copies = np.concatenate(list(planted.values())) if planted else np.zeros(0, np.int64)
    distinct = np.ones(rows, bool)
    distinct[copies] = False
    out = {level: {"planted": len(c), "recall": round(float((reasons[c] != "").mean()) if len(c) else 1.0, 5),
                   "as_its_reason": round(float((reasons[c] == REASONS[level]).mean()) if len(c) else 1.0, 5)}
           for level, c in planted.items()}
    out["false_positive_rate"] = float((reasons[distinct] != "").sum() / distinct.sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--part-size", type=int, default=50_000)
    parser.add_argument("--levels", default="rows,exact,phash")
    parser.add_argument("--rate", type=float, default=0.01, help="planted copies per level, as a fraction of the rows")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.9, help="clip_score's top fraction")
    parser.add_argument("--config", default=str(config.CONFIG_ROOT / "data" / "default.yaml"),
                        help="the build config whose dataset-phase settings run (default: the one a user gets); '' for the dataclass defaults")
    parser.add_argument("--dir", default="", help="work folder (default: a temporary one)")
    parser.add_argument("--tars", action="store_true", help="write download tars and run reshard/shards (Python tar writing dominates the synthesis)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    levels = args.levels.split(",")
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as root:
        start = time.perf_counter()
        planted = synthesise(root, args.rows, args.part_size, levels, args.rate, tars=args.tars)
        synth_s = time.perf_counter() - start
        cfg = config.load(build_shards.BuildConfig, args.config or None, ["steps=[clip_score,dedupe]", f"clip_score.fraction={args.fraction}",
                                                           f"dedupe.levels=[{','.join(levels)}]", f"executor.workers={args.workers}",
                                                           "log_level=WARNING", *args.overrides])
        build = build_shards.Build(cfg, root)
        executor = Local(cfg.executor, fresh_process=True)
        usage = []
        try:
            for stage in ("clip_score", "dedupe", "reshard"):
                usage += build.run_dataset(stage, executor, skip=() if args.tars else ("reshard/shards",))
                print(json.dumps(summarise(usage, args.rows)), file=sys.stderr, flush=True)
        finally:
            executor.close()
        stats = json.loads(open(f"{root}/stats.json").read())
        parts = build.index["parts"]
        result = {"rows": args.rows, "part_size": args.part_size, "parts": parts, "levels": levels, "workers": args.workers,
                  "cpus": os.cpu_count(), "synthesis_s": round(synth_s, 1), "phases": summarise(usage, args.rows),
                  "total_wall_s": round(sum(p["wall_s"] for p in usage), 1), "dedupe": accuracy(build.layout, parts, args.rows, planted),
                  "kept": stats["kept"], "shards": stats["shards"], "dropped": stats["dropped"],
                  "unaccounted": args.rows - stats["kept"] - sum(n for reasons in stats["dropped"].values() for n in reasons.values()),
                  "config": args.config, "dedupe_config": {level: config.to_dict(getattr(cfg.dedupe, level)) for level in levels
                                                           if hasattr(cfg.dedupe, level)}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
