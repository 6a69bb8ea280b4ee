"""Deduplication as a cascade of levels; in every group of copies the first input row survives.

Levels (run in the configured order, each on what the previous ones kept):
- ``rows``: the same uid twice (the same url and caption listed again) -> duplicate_row
- ``exact``: the same sha256 of the downloaded bytes -> exact_dup
- ``phash``: photos within a few bits of pHash, banded to scale (see filter/phash.py) -> near_dup
- ``pixel``: the same picture re-encoded, resized, shifted or mirrored (see filter/near_dup.py) -> near_dup
- ``embedding``: SemDeDup: k-means over image embeddings, then pairs within a cluster whose cosine
  passes ``threshold`` (and, optionally, beats each item's k-th neighbour by ``margin``, a
  copy-detection style normalisation that keeps look-alike classes apart) -> semantic_dup
- ``caption``: the same normalised caption -> caption_dup (off by default: templated captions repeat)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import tempfile
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from filter import STEPS, Step, decisions, near_dup, phash, semdedup
from filter.buckets import components
from filter.embedders import EMBEDDERS
from filter.near_dup import PixelDedupeConfig, thumbnail
from pipeline.core.io import atomic_write
from pipeline.core.log import get_logger
from pipeline.core.registry import Registry

log = get_logger(__name__)
LEVELS: Registry = Registry("dedupe level")


@dataclasses.dataclass(kw_only=True)
class EmbeddingDedupeConfig:
    embedder: str = "clip_score"  # see filter/embedders.py
    image_size: int = 224  # input side for embedders computed here
    threshold: float = 0.95  # cosine
    margin: float = 0.0  # and at least this much above both items' k-th neighbour similarity
    background_k: int = 10
    cluster_size: int = 2000  # SemDeDup: n / cluster_size k-means clusters (larger: better recall, quadratic cost)
    probes: int = 1  # clusters each item joins (its nearest centroids): copies on a cluster boundary still meet
    sample: int = 262144  # k-means training rows (a fixed seeded sample: every row when there are fewer)
    task_rows: int = 100000  # cluster members per task (clusters grouped up to this): bounds a task's memory
    block_rows: int = 2048  # similarity rows computed at once within a cluster: memory block_rows x members


@dataclasses.dataclass(kw_only=True)
class DedupeConfig:
    levels: list[str] = dataclasses.field(default_factory=lambda: ["rows", "exact", "phash", "pixel", "embedding"])
    phash: phash.PhashConfig = dataclasses.field(default_factory=phash.PhashConfig)
    pixel: PixelDedupeConfig = dataclasses.field(default_factory=PixelDedupeConfig)
    embedding: EmbeddingDedupeConfig = dataclasses.field(default_factory=EmbeddingDedupeConfig)

    def validate(self) -> None:
        for level in self.levels:
            LEVELS.get(level)


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


def first_of_equal(values: np.ndarray) -> np.ndarray:
    """(n,) index of the first item with the same value (items are in input order)."""
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    return first[inverse]


@LEVELS.register("rows")
def _rows(f: Features, cfg: DedupeConfig) -> tuple[np.ndarray, str]:
    return first_of_equal(f.uid), "duplicate_row"


@LEVELS.register("exact")
def _exact(f: Features, cfg: DedupeConfig) -> tuple[np.ndarray, str]:
    return first_of_equal(f.sha256), "exact_dup"


@LEVELS.register("caption")
def _caption(f: Features, cfg: DedupeConfig) -> tuple[np.ndarray, str]:
    return first_of_equal(f.caption), "caption_dup"


@LEVELS.register("phash")
def _phash(f: Features, cfg: DedupeConfig) -> tuple[np.ndarray, str]:
    hashed = np.flatnonzero(f.has_phash)
    pairs = hashed[phash.matching_pairs(f.phash[hashed], cfg.phash)]
    return components(len(f.rows), pairs), "near_dup"


@LEVELS.register("pixel")
def _pixel(f: Features, cfg: DedupeConfig) -> tuple[np.ndarray, str]:
    with tempfile.TemporaryDirectory() as workdir:
        return near_dup.level([f.thumbs], cfg.pixel, workdir).run(), "near_dup"


@LEVELS.register("embedding")
def _embedding(f: Features, cfg: DedupeConfig) -> tuple[np.ndarray, str]:
    with tempfile.TemporaryDirectory() as workdir:
        return semdedup.level([f.embeddings], cfg.embedding, workdir).run(), "semantic_dup"


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

    def dataset(self, table: pa.Table) -> list[str]:
        features, order = self._features(table)
        reasons = np.full(len(order), "", dtype=object)
        alive = np.arange(len(order))  # positions in row order
        for level in self.cfg.levels:
            root, reason = LEVELS.get(level)(features.take(alive), self.cfg)
            dropped = root != np.arange(len(alive))
            reasons[alive[dropped]] = reason
            log.info("dedupe %s: %d of %d dropped as %s", level, dropped.sum(), len(alive), reason)
            alive = alive[~dropped]
        out = np.empty(len(order), dtype=object)
        out[order] = reasons  # back to the table's order
        return out.tolist()

    def _features(self, table: pa.Table) -> tuple[Features, np.ndarray]:
        layout, name, parts = self.context.layout, self.context.name, sorted(set(table["part"].to_pylist()))
        load: Callable[[str], np.ndarray | None] = lambda kind: (
            np.concatenate([np.load(layout.step(name, p, f".{kind}.npy")) for p in parts]) if parts else None
        )
        order = np.argsort(table["row"].to_numpy(), kind="stable")
        columns = [table[c].to_numpy(zero_copy_only=False) for c in ("row", "uid", "sha256", "caption_norm")]
        hashes = has_hash = None
        if "phash" in self.cfg.levels:
            hashes = np.stack([table[c].fill_null(0).to_numpy() for c in ("phash", "phash_mirror")], 1)
            has_hash = table["phash"].is_valid().to_numpy(zero_copy_only=False)
        thumbs = load("thumbs") if "pixel" in self.cfg.levels else None
        emb = load("embed") if "embedding" in self.cfg.levels else None
        return Features(*columns, hashes, has_hash, thumbs, emb).take(order), order


def _save(path: str, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array)
