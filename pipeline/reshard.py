"""Resharding: the survivors of every step, as balanced output shards keyed by uid.

Partitioned like every dataset-wide phase, never holding all rows in one process:

- ``survivors`` (per part): the part's rows kept by every step, in row order, with their image
  format -> ``reshard/survivors/{part}.parquet``.
- ``plan`` (once): per-part survivor counts (parquet footers) and their prefix sum fix the output:
  survivors in (part, row) order, cut into equal contiguous runs, one per shard ->
  ``reshard_plan.parquet`` (part, offset, survivors) and ``sizes.json``. A rerun after a kill
  writes exactly the same uids into the same shards.
- ``shards`` (per output shard): shard ``{i}.tar`` from the few parts its run spans (members
  ``<uid>.<jpg|png|webp|gif|bmp>``, ``<uid>.txt``, ``<uid>.json``).
- ``manifest`` (per part): the part's manifest rows (pipeline/manifest.py) -> ``reshard/manifest/{part}.parquet``.
- ``finalize`` (once): the parts' manifests streamed into ``manifest.parquet``, and ``stats.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import fsspec

from pipeline.core.io import atomic_write, exists, read_json, read_parquet, write_json, write_parquet
from pipeline.core.log import get_logger
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


def survivors_path(layout: Layout, part: int) -> str:
    return f"{layout.root}/reshard/survivors/{part:06d}.parquet"


def manifest_path(layout: Layout, part: int) -> str:
    return f"{layout.root}/reshard/manifest/{part:06d}.parquet"


def write_survivors(layout: Layout, part: int, rows: pa.Array, formats: pa.Table | None) -> None:
    """``rows``: the part's kept rows in row order; ``formats``: (row, format) of the basic step, if it ran."""
    table = pa.table({"row": rows})
    if formats is not None:
        table = table.join(formats, "row", join_type="left outer").sort_by("row")
    write_parquet(survivors_path(layout, part), table)


def plan(layout: Layout, parts: int, cfg: ReshardConfig) -> pa.Table:
    """part -> (offset, survivors) of the output order; written once (identical if computed twice)."""
    if exists(layout.at_root("reshard_plan.parquet")):
        return read_parquet(layout.at_root("reshard_plan.parquet"))
    counts = np.array([_num_rows(survivors_path(layout, p)) for p in range(parts)], np.int64)
    offset = np.cumsum(counts) - counts
    total = int(counts.sum())
    count = shard_count(total, cfg)
    table = pa.table({"part": np.arange(parts, dtype=np.int64), "offset": offset, "survivors": counts})
    table = table.replace_schema_metadata({"shards": str(count)})
    bounds = shard_bounds(total, count)
    write_json(layout.at_root("sizes.json"), {f"shards/{i:06d}.tar": int(bounds[i + 1] - bounds[i]) for i in range(count)})
    write_parquet(layout.at_root("reshard_plan.parquet"), table)
    return table


def shards_of(table: pa.Table) -> int:
    return int(table.schema.metadata[b"shards"])


def shard_bounds(total: int, count: int) -> np.ndarray:
    """(count + 1,) first output position of every shard: position p goes to shard p * count // total."""
    i = np.arange(count + 1, dtype=np.int64)
    return (i * total + count - 1) // count


def _num_rows(path: str) -> int:
    with fsspec.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def write_shard(layout: Layout, table: pa.Table, index: int) -> None:
    """Output shard ``index`` (skipped when present): its run of survivors, read from the parts it spans."""
    if exists(layout.shard(index)):
        return
    offset, counts = table["offset"].to_numpy(), table["survivors"].to_numpy()
    bounds = shard_bounds(int(counts.sum()), shards_of(table))
    lo, hi = bounds[index], bounds[index + 1]
    members = []
    for part in np.flatnonzero((offset < hi) & (offset + counts > lo)):
        mine = read_parquet(survivors_path(layout, int(part))).slice(max(lo - offset[part], 0), min(hi, offset[part] + counts[part]) - max(lo, offset[part]))
        formats = dict(zip(mine["row"].to_pylist(), mine["format"].to_pylist())) if "format" in mine.column_names else {}
        found = sorted(alive(samples(layout.download(int(part), ".tar")), set(mine["row"].to_pylist())), key=lambda s: s["row"])
        members += [m for s in found for m in _members(s, formats.get(s["row"]) or "")]
    write_tar(layout.shard(index), members)


def shard_column(layout: Layout, table: pa.Table, part: int, rows: pa.Array) -> pa.Array:
    """The output shard of each of the part's ``rows`` (-1 for rows not kept)."""
    survivors = read_parquet(survivors_path(layout, part), ["row"])["row"]
    start, total = int(table["offset"][part].as_py()), int(pc.sum(table["survivors"]).as_py() or 0)
    position = np.asarray(pc.fill_null(pc.index_in(rows, value_set=survivors), -1), np.int64)  # int32: x shards passes 2^31 at ~2M kept
    shard = np.where(position >= 0, (start + position) * shards_of(table) // max(total, 1), -1)
    return pa.array(shard, pa.int64())


def _members(sample: dict, fmt: str) -> list[tuple[str, bytes]]:
    uid = sample["uid"]
    meta = {k: v for k, v in sample["meta"].items() if k not in ("key", "status", "error_message", "exif")}
    return [(f"{uid}.{FORMAT_EXTENSIONS.get(fmt, 'jpg')}", sample["image"]), (f"{uid}.txt", sample["caption"].encode()),
            (f"{uid}.json", json.dumps(meta, sort_keys=True).encode())]


def finalize(layout: Layout, parts: int, shard_total: int) -> dict:
    """manifest.parquet (the parts' manifests, one part in memory at a time) and stats.json."""
    paths = [manifest_path(layout, p) for p in range(parts)]
    schemas = []
    for path in paths:
        with fsspec.open(path, "rb") as f:
            schemas.append(pq.ParquetFile(f).schema_arrow)
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    counts, kept, rows = [], 0, 0
    with atomic_write(layout.at_root("manifest.parquet")) as f, pq.ParquetWriter(f, schema) as writer:
        for path in paths:
            table = read_parquet(path)
            table = pa.table({name: table[name] if name in table.column_names else pa.nulls(table.num_rows, schema.field(name).type)
                              for name in schema.names}).cast(schema)
            writer.write_table(table)
            rows += table.num_rows
            kept += int(pc.sum(pc.greater_equal(table["shard"], 0)).as_py() or 0)
            counts.append(table.filter(pc.not_equal(table["dropped_by"], "")).group_by(["dropped_by", "reason"]).aggregate([([], "count_all")]))
    totals = pa.concat_tables(counts).group_by(["dropped_by", "reason"]).aggregate([("count_all", "sum")]).to_pylist() if counts else []
    dropped: dict[str, dict[str, int]] = {}
    for entry in sorted(totals, key=lambda e: (e["dropped_by"], e["reason"])):
        dropped.setdefault(entry["dropped_by"], {})[entry["reason"]] = entry["count_all_sum"]
    stats = {"input_rows": rows, "kept": kept, "shards": shard_total, "dropped": dropped}
    write_json(layout.at_root("stats.json"), stats)
    return stats
