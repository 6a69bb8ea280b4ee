"""Resharding: the survivors of every step, as balanced output shards keyed by uid.

``plan`` fixes which input row goes to which output shard (survivors in input order, cut into
equal runs), so a rerun after a kill writes exactly the same uids into the same shards.
``write_shards`` writes shards ``{i}.tar`` (members ``<uid>.<jpg|png|webp|gif|bmp>``, ``<uid>.txt``,
``<uid>.json``); ``finalize`` writes sizes.json, manifest.parquet and stats.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.io import exists, read_parquet, write_json, write_parquet
from pipeline.core.log import get_logger, progress
from pipeline.core.shards import FORMAT_EXTENSIONS, Layout, alive, samples, write_tar

log = get_logger(__name__)


@dataclasses.dataclass(kw_only=True)
class ReshardConfig:
    target_shard_size: int = 10000  # samples per output shard, at most
    min_shards: int = 1
    # The training job that will read the shards: every (node, GPU, loader worker) needs a shard.
    nodes: int = 1
    gpus_per_node: int = 1
    workers_per_gpu: int = 2


def shard_count(kept: int, cfg: ReshardConfig) -> int:
    readers = cfg.nodes * cfg.gpus_per_node * cfg.workers_per_gpu
    by_size = math.ceil(kept / cfg.target_shard_size)
    count = max(cfg.min_shards, readers, by_size)
    log.info(
        "reshard: %d shards = max(min_shards %d, nodes x gpus x workers %d x %d x %d = %d, ceil(%d kept / %d per shard) = %d)",
        count, cfg.min_shards, cfg.nodes, cfg.gpus_per_node, cfg.workers_per_gpu, readers, kept, cfg.target_shard_size, by_size,
    )
    if count > kept:
        raise ValueError(f"only {kept} samples kept, fewer than the {count} shards the readers need; lower reshard.* or keep more")
    return count


def plan(layout: Layout, survivors: np.ndarray, parts: np.ndarray, cfg: ReshardConfig) -> pa.Table:
    """row -> output shard, for the sorted survivor rows (in input ``parts``); written once (identical if computed twice)."""
    if exists(layout.at_root("reshard_plan.parquet")):
        return read_parquet(layout.at_root("reshard_plan.parquet"))
    count = shard_count(len(survivors), cfg)
    shard = (np.arange(len(survivors)) * count) // len(survivors)  # equal contiguous runs
    table = pa.table({"row": survivors, "part": parts, "shard": shard})
    write_parquet(layout.at_root("reshard_plan.parquet"), table)
    return table


def write_shards(layout: Layout, table: pa.Table, shards: range, formats: dict[int, str]) -> None:
    """Write output shards ``shards`` (skipping finished ones); ``formats`` maps row -> image format."""
    shard_of = table["shard"].to_numpy()
    for index in progress(shards, desc="reshard", unit="shard"):
        if exists(layout.shard(index)):
            continue
        mine = table.filter(pa.array(shard_of == index))
        rows = set(mine["row"].to_pylist())
        found = [s for part in sorted(set(mine["part"].to_pylist())) for s in alive(samples(layout.download(part, ".tar")), rows)]
        found.sort(key=lambda s: s["row"])
        write_tar(layout.shard(index), (m for s in found for m in _members(s, formats.get(s["row"], ""))))


def _members(sample: dict, fmt: str) -> list[tuple[str, bytes]]:
    uid = sample["uid"]
    meta = {k: v for k, v in sample["meta"].items() if k not in ("key", "status", "error_message", "exif")}
    return [(f"{uid}.{FORMAT_EXTENSIONS.get(fmt, 'jpg')}", sample["image"]), (f"{uid}.txt", sample["caption"].encode()),
            (f"{uid}.json", json.dumps(meta, sort_keys=True).encode())]


def finalize(layout: Layout, manifest: pa.Table, shard_total: int) -> dict:
    """sizes.json, manifest.parquet and stats.json from the complete manifest."""
    shard = manifest["shard"].to_numpy()
    sizes = {f"shards/{i:06d}.tar": int((shard == i).sum()) for i in range(shard_total)}
    write_json(layout.at_root("sizes.json"), sizes)
    write_parquet(layout.at_root("manifest.parquet"), manifest)
    dropped: dict[str, Counter] = {}
    for step, reason in zip(manifest["dropped_by"].to_pylist(), manifest["reason"].to_pylist()):
        if step:
            dropped.setdefault(step, Counter())[reason] += 1
    stats = {"input_rows": manifest.num_rows, "kept": int(pc.sum(pc.greater_equal(manifest["shard"], 0)).as_py() or 0),
             "shards": shard_total, "dropped": {s: dict(sorted(c.items())) for s, c in dropped.items()}}
    write_json(layout.at_root("stats.json"), stats)
    return stats
