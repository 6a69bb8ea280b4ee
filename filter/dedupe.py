"""Deduplication as a cascade of levels; in every group of copies the first input row survives.

Levels (run in the configured order, each on what the previous ones kept):
- ``rows``: the same uid twice (the same url and caption listed again) -> duplicate_row
- ``exact``: the same sha256 of the downloaded bytes -> exact_dup
- ``phash``: photos within a few bits of pHash, candidates per multi-index key (see filter/phash.py) -> near_dup
- ``pixel``: the same picture re-encoded, resized, shifted or mirrored (filter/near_dup.py; bucketed: filter/pixel_dedupe.py) -> near_dup
- ``embedding``: SemDeDup (filter/semdedup.py): k-means over image embeddings, then pairs within a cluster whose cosine
  passes ``threshold`` (and, optionally, beats each item's k-th neighbour by ``margin``, a
  copy-detection style normalisation that keeps look-alike classes apart) -> semantic_dup
- ``caption``: the same normalised caption -> caption_dup (off by default: templated captions repeat)

Every level is partitioned work (see :class:`Level`): an optional ``prepare`` task, a ``map``
task per input part that sends the features of its rows still in the running to partitions, a
``reduce`` task per partition that finds pairs of copies, and a ``merge`` task that joins the
pairs of every partition into groups (connected components; the group's smallest input row
survives). A ``decide`` task per part then writes the step's decisions. The files:

    steps/dedupe/{part}.parquet, {part}.thumbs.npy, {part}.embed.npy    the shard phase (row-aligned)
    steps/dedupe/levels/{k}-{level}/map/{part}.arrow        a record batch per partition
    steps/dedupe/levels/{k}-{level}/pairs/{partition}.parquet   a, b (input rows), part_a, part_b
    steps/dedupe/levels/{k}-{level}/drops.arrow             row; a record batch per part
    steps/dedupe/levels/{k}-{level}/...                     the level's own files (prepare, per part)
    steps/dedupe/decisions/{part}.parquet                   row, reason
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import re
import tempfile
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from filter import STEPS, Phase, Step, decisions, dropped, phash
from filter.near_dup import PixelDedupeConfig, thumbnail
from pipeline.core.io import atomic_write, exists, read_parquet, write_parquet
from pipeline.core.log import get_logger
from pipeline.core.partition import components, hash_partition, hex_digests, partition_of, read_partition, split, text_digests, write_partitioned
from pipeline.core.registry import Registry

log = get_logger(__name__)
LEVELS: Registry = Registry("dedupe level", package="filter")  # pixel and embedding register from their own files


@dataclasses.dataclass(kw_only=True)
class EmbeddingDedupeConfig:
    embedder: str = "clip_score"  # see filter/inference/embedders.py
    image_size: int = 224  # input side for embedders computed here
    threshold: float = 0.95  # cosine
    margin: float = 0.0  # and at least this much above both items' k-th neighbour similarity
    background_k: int = 10
    cluster_size: int = 2000  # SemDeDup: n / cluster_size k-means clusters (larger: better recall, quadratic cost)
    probes: int = 1  # clusters each item joins (its nearest centroids): copies on a cluster boundary still meet
    sample: int = 262144  # k-means training rows (a fixed seeded sample: every row when there are fewer); at most sample / 64 centroids
    block_rows: int = 2048  # similarity rows computed at once within a cluster: memory block_rows x members


@dataclasses.dataclass(kw_only=True)
class DedupeConfig:
    levels: list[str] = dataclasses.field(default_factory=lambda: ["rows", "exact", "phash", "pixel", "embedding"])
    partition_rows: int = 1_000_000  # map records one reduce task holds, about: partitions = ceil(records / this)
    phash: phash.PhashConfig = dataclasses.field(default_factory=phash.PhashConfig)
    pixel: PixelDedupeConfig = dataclasses.field(default_factory=PixelDedupeConfig)
    embedding: EmbeddingDedupeConfig = dataclasses.field(default_factory=EmbeddingDedupeConfig)

    def validate(self) -> None:
        for level in self.levels:
            LEVELS.get(level)
        if self.partition_rows < 1:
            raise ValueError(f"partition_rows must be >= 1, got {self.partition_rows}")


# ---------------------------------------------------------------------------- the level interface


@dataclasses.dataclass
class LevelContext:
    """What a level's tasks read and where they write."""

    cfg: DedupeConfig
    parts: int
    rows: int  # at most this many rows in the running (parts x part size): sizes the partitions
    folder: str  # the level's own folder: prepare's outputs, per-part files of its own
    arrays: Callable[[int, str], np.ndarray]  # (part, "thumbs" | "embed") -> the shard phase's array, memory-mapped
    alive: Callable[[int], pa.Table]  # part -> its rows still in the running (what ``map`` gets)


class Level:
    """One dedupe level as partitioned work; the framework writes, reads and merges the files.

    ``map(part, table)`` gets the part's rows still in the running, in row order: the shard
    phase's columns (row, uid, sha256, caption_norm, phash, phash_mirror) plus ``part`` and
    ``index`` (the row's position in the part's table and arrays: ``ctx.arrays(part, kind)[index]``).
    It returns ``{partition: table}`` (each table keeps ``row`` and ``part``); ``reduce(partition,
    table)`` gets the rows every part sent there and returns (M, 2) int64 pairs of input rows
    that are copies. Pairs may repeat and may come from several partitions."""

    reason: str
    fanout: float = 1.0  # map records per row in the running (sizes the partitions)
    has_prepare = False  # True: ``prepare()`` runs once, before the maps (e.g. k-means on a sample)

    def __init__(self, ctx: LevelContext):
        self.ctx = ctx

    @property
    def partitions(self) -> int:
        return max(1, math.ceil(self.ctx.rows * self.fanout / self.ctx.cfg.partition_rows))

    def prepare(self) -> None:
        pass

    def map(self, part: int, table: pa.Table) -> dict[int, pa.Table]:
        raise NotImplementedError

    def reduce(self, partition: int, table: pa.Table) -> np.ndarray:
        raise NotImplementedError


NO_PAIRS = np.zeros((0, 2), np.int64)
MERGE_BATCH = 1 << 20  # pairs read before the merge de-duplicates what it holds


class KeyLevel(Level):
    """Copies share a key: partitioned by a hash of its binary digest; pairs (first row of the key, row)."""

    column: str

    def digests(self, column: pa.ChunkedArray) -> np.ndarray:
        raise NotImplementedError

    def map(self, part: int, table: pa.Table) -> dict[int, pa.Table]:
        digests = self.digests(table[self.column])
        key = pa.FixedSizeBinaryArray.from_buffers(pa.binary(digests.shape[1]), len(digests), [None, pa.py_buffer(digests.tobytes())])
        out = pa.table({"row": table["row"], "part": table["part"], "key": key})
        partition = hash_partition(digests, self.partitions)
        return split(out, partition)

    def reduce(self, partition: int, table: pa.Table) -> np.ndarray:
        first = table.group_by("key").aggregate([("row", "min")])
        joined = table.select(["key", "row"]).join(first, "key")
        copies = joined.filter(pc.not_equal(joined["row"], joined["row_min"]))
        return np.stack([copies["row_min"].to_numpy(), copies["row"].to_numpy()], 1).astype(np.int64)


@LEVELS.register("rows")
class Rows(KeyLevel):
    reason, column = "duplicate_row", "uid"

    def digests(self, column):
        return hex_digests(column, 32)


@LEVELS.register("exact")
class Exact(KeyLevel):
    reason, column = "exact_dup", "sha256"

    def digests(self, column):
        return hex_digests(column, 64)


@LEVELS.register("caption")
class Caption(KeyLevel):
    reason, column = "caption_dup", "caption_norm"

    def digests(self, column):
        return text_digests(column)


@LEVELS.register("phash")
class Phash(Level):
    """Candidates per key value: every (key, value) is one partition's, so a reduce task sees all the
    hashes sharing it and compares each with its next ``window`` neighbours (filter/phash.py)."""

    reason = "near_dup"

    @property
    def fanout(self) -> float:
        return 2 * len(phash.key_masks(self.ctx.cfg.phash))  # both orientations, every key

    def map(self, part: int, table: pa.Table) -> dict[int, pa.Table]:
        table = table.filter(table["phash"].is_valid())
        hashes = np.stack([table[c].to_numpy() for c in ("phash", "phash_mirror")], 1).astype(np.uint64)
        item, orient, key, value = phash.candidate_keys(hashes, self.ctx.cfg.phash)
        # the reduce recomputes the key value from the hashes: records stay 30 bytes
        out = pa.table({"row": table["row"].take(item), "part": table["part"].cast(pa.int32()).take(item), "key": key,
                        "orient": orient, "h0": hashes[item, 0], "h1": hashes[item, 1]})
        partition = partition_of(value ^ key.astype(np.uint64), self.partitions)  # a key value -> one partition
        return split(out, partition)

    def reduce(self, partition: int, table: pa.Table) -> np.ndarray:
        col = {c: table[c].to_numpy() for c in ("row", "orient", "key", "h0", "h1")}
        return phash.close_pairs(col["row"], col["orient"], col["key"], col["h0"], col["h1"], self.ctx.cfg.phash)


@dataclasses.dataclass
class Features:
    """Per-sample features of the samples still in the running, sorted by input row."""

    rows: np.ndarray
    uid: np.ndarray
    sha256: np.ndarray
    caption: np.ndarray
    phash: np.ndarray | None  # (n, 2) uint64: the image's pHash and its mirror's
    has_phash: np.ndarray | None  # (n,) False for images too small to hash
    thumbs: np.ndarray | None
    embeddings: np.ndarray | None

    def take(self, index: np.ndarray) -> "Features":
        return Features(*(None if v is None else v[index] for v in dataclasses.astuple(self)))


def normalize_caption(caption: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", caption.lower()).split())



@STEPS.register("dedupe")
class Dedupe(Step):
    Config = DedupeConfig
    has_dataset_phase = True

    def shard(self, part: int, samples: Iterator[dict]) -> pa.Table:
        batch = list(samples)
        cfg, layout, name = self.cfg, self.context.layout, self.context.name
        thumbs, hashes = [], []
        for sample in batch if {"pixel", "phash"} & set(cfg.levels) else ():
            image = Image.open(io.BytesIO(sample["image"])).convert("L")  # decoded and grey once for both levels
            if "pixel" in cfg.levels:
                thumbs.append(thumbnail(image, cfg.pixel))
            if "phash" in cfg.levels:
                hashes.append(phash.phash(image, cfg.phash) or (None, None))
        if "pixel" in cfg.levels:
            empty = np.zeros((0, cfg.pixel.size, cfg.pixel.size), np.uint8)
            _save(layout.step(name, part, ".thumbs.npy"), np.stack(thumbs) if thumbs else empty)
        if "embedding" in cfg.levels:
            from filter.inference.embedders import EMBEDDERS  # imports torch: only this shard phase embeds

            embedder = EMBEDDERS.build(cfg.embedding.embedder, layout, cfg.embedding.image_size)
            rows, emb = embedder.part(part, iter(batch))
            where = {r: i for i, r in enumerate(rows)}
            _save(layout.step(name, part, ".embed.npy"), emb[[where[s["row"]] for s in batch]] if batch else emb[:0])
        hash_columns = {}
        if "phash" in cfg.levels:
            hash_columns = {key: pa.array([h[i] for h in hashes], pa.uint64()) for i, key in enumerate(("phash", "phash_mirror"))}
        return decisions(
            [s["row"] for s in batch], [""] * len(batch), uid=[s["uid"] for s in batch],
            sha256=[s["meta"].get("sha256") or hashlib.sha256(s["image"]).hexdigest() for s in batch],
            caption_norm=[normalize_caption(s["caption"]) for s in batch], **hash_columns,
        )

    # ------------------------------------------------------------------ the dataset-wide phases

    def folder(self, k: int) -> str:
        return f"{self.context.layout.root}/steps/{self.context.name}/levels/{k}-{self.cfg.levels[k]}"

    def level(self, k: int) -> Level:
        ctx = LevelContext(self.cfg, self.context.parts, self.context.parts * self.context.index["part_size"], self.folder(k), self._array,
                           lambda part: self.alive(k, part))
        return LEVELS.build(self.cfg.levels[k], ctx)

    def _array(self, part: int, kind: str) -> np.ndarray:
        return np.load(self.context.layout.step(self.context.name, part, f".{kind}.npy"), mmap_mode="r")

    def alive(self, k: int, part: int) -> pa.Table:
        """The part's rows in the running at level k: its shard table less what levels < k dropped."""
        table = read_parquet(self.context.layout.step(self.context.name, part))
        table = table.append_column("part", pa.array(np.full(table.num_rows, part, np.int64)))
        table = table.append_column("index", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        gone = [t["row"] for j in range(k) if (t := read_partition([f"{self.folder(j)}/drops.arrow"], part)) is not None]
        if gone:
            table = table.filter(pc.invert(pc.is_in(table["row"], pa.chunked_array(gone).combine_chunks())))
        return table.sort_by("row")

    def phases(self) -> list[Phase]:
        name, parts, out = self.context.name, self.context.parts, []
        for k, level_name in enumerate(self.cfg.levels):
            level = self.level(k)
            at = f"{name}/{k}-{level_name}"
            if level.has_prepare:
                out.append(Phase(f"{at}/prepare", "once", 1, lambda i, k=k: self.prepare(k)))
            out += [Phase(f"{at}/map", "part", parts, lambda i, k=k: self.map(k, i)),
                    Phase(f"{at}/reduce", "partition", level.partitions, lambda i, k=k: self.reduce(k, i)),
                    Phase(f"{at}/merge", "once", 1, lambda i, k=k: self.merge(k))]
        return out + [Phase(f"{name}/decide", "part", parts, self.decide)]

    def prepare(self, k: int) -> None:
        if not exists(f"{self.folder(k)}/prepared"):
            self.level(k).prepare()
            with atomic_write(f"{self.folder(k)}/prepared", "w"):
                pass

    def map(self, k: int, part: int) -> None:
        path = f"{self.folder(k)}/map/{part:06d}.arrow"
        if not exists(path):
            level = self.level(k)
            write_partitioned(path, level.map(part, self.alive(k, part)), level.partitions)

    def reduce(self, k: int, partition: int) -> None:
        path = f"{self.folder(k)}/pairs/{partition:06d}.parquet"
        if exists(path):
            return
        level = self.level(k)
        table = read_partition([f"{self.folder(k)}/map/{p:06d}.arrow" for p in range(self.context.parts)], partition)
        pairs = NO_PAIRS if table is None else level.reduce(partition, table)
        part_of = _lookup(table, pairs) if len(pairs) else (np.zeros(0, np.int64),) * 2
        write_parquet(path, pa.table({"a": pairs[:, 0], "b": pairs[:, 1], "part_a": part_of[0], "part_b": part_of[1]}))

    def merge(self, k: int) -> None:
        """Groups of copies over every partition's pairs; all but the smallest row of each are dropped.

        A pair that several keys found arrives from several partitions (up to 30 for phash), so the
        pairs are de-duplicated while they are read: the task holds each pair about once."""
        path = f"{self.folder(k)}/drops.arrow"
        if exists(path):
            return
        pairs, read, held = np.zeros((0, 4), np.int64), [], 0  # (row a, row b, part of a, part of b)
        for p in range(self.level(k).partitions):
            table = read_parquet(f"{self.folder(k)}/pairs/{p:06d}.parquet")
            read.append(np.stack([table[c].to_numpy() for c in ("a", "b", "part_a", "part_b")], 1))
            held += table.num_rows
            if held > max(len(pairs), MERGE_BATCH):
                pairs, read, held = np.unique(np.concatenate([pairs, *read]), axis=0), [], 0
        pairs = np.unique(np.concatenate([pairs, *read]), axis=0)
        nodes, root = components(pairs[:, :2])
        _, first = np.unique(pairs[:, :2].T.ravel(), return_index=True)  # the part of every node
        part = pairs[:, 2:].T.ravel()[first]
        drop = nodes != root
        write_partitioned(path, split(pa.table({"row": nodes[drop], "part": part[drop]}), part[drop]), self.context.parts)
        log.info("dedupe %s: %d dropped as %s", self.cfg.levels[k], drop.sum(), self.level(k).reason)

    def decide(self, part: int) -> None:
        path = self.context.layout.decisions(self.context.name, part)
        if exists(path):
            return
        rows, reasons = [], []
        for k in range(len(self.cfg.levels)):
            table = read_partition([f"{self.folder(k)}/drops.arrow"], part)
            if table is not None:
                rows.append(table["row"].to_numpy())
                reasons += [self.level(k).reason] * table.num_rows
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        order = np.argsort(rows, kind="stable")
        write_parquet(path, dropped(rows[order], np.array(reasons, dtype=object)[order].tolist()))


def _lookup(table: pa.Table, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The parts of both rows of every pair, from the reduce task's input."""
    rows, first = np.unique(table["row"].to_numpy(), return_index=True)
    part = table["part"].to_numpy()[first].astype(np.int64)  # one type in every pairs file (phash's records carry int32)
    return part[np.searchsorted(rows, pairs[:, 0])], part[np.searchsorted(rows, pairs[:, 1])]


def roots(level: str, features: Features, cfg: DedupeConfig) -> np.ndarray:
    """(n,) the position of the item each item's group keeps: level ``level`` run in memory over one
    part, through the same map, reduce and merge as the build (tests, benchmarks)."""
    n = len(features.rows)
    text = {"uid": features.uid, "sha256": features.sha256, "caption_norm": features.caption}  # what the level has (the embedding one: none)
    table = pa.table({"row": np.asarray(features.rows, np.int64), **{k: v for k, v in text.items() if v is not None},
                      "part": np.zeros(n, np.int64), "index": np.arange(n)})
    if features.phash is not None:
        valid = ~np.asarray(features.has_phash, bool)
        table = table.append_column("phash", pa.array(features.phash[:, 0], mask=valid)).append_column(
            "phash_mirror", pa.array(features.phash[:, 1], mask=valid))
    arrays = {"thumbs": features.thumbs, "embed": features.embeddings}
    with tempfile.TemporaryDirectory() as folder:
        ctx = LevelContext(cfg, 1, n, folder, lambda part, kind: arrays[kind], lambda part: table)
        lvl = LEVELS.build(level, ctx)
        lvl.prepare()
        sent = lvl.map(0, table)
        found = [lvl.reduce(p, t) for p, t in sorted(sent.items())]
    nodes, root = components(np.concatenate(found) if found else NO_PAIRS)
    out = np.arange(n)
    position = np.searchsorted(features.rows, nodes)
    out[position] = np.searchsorted(features.rows, root)
    return out


def _save(path: str, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array)
