"""CLIP-score filter: cosine of a pair's image and text embeddings, kept by threshold or top fraction.

The model is any ``train.encoder.load_encoder`` spec: ``open_clip:MODEL[:PRETRAINED]`` or a run
directory of this project. Inference is batched over the WebDataset shards with DataLoader
workers decoding and preprocessing (clip-retrieval's approach). Embeddings are kept, L2-normalised
float16 and row-aligned with the shard's parquet (``{part}.image.npy``, ``{part}.text.npy``), so
dedupe and later analysis reuse them. LAION-400M kept cosine >= 0.30 (ViT-B/32), LAION-5B English
0.28; DataComp's best baseline keeps the top 30% of the whole pool, which is computed here over
every shard at once, never per shard.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from filter import STEPS, Step, decisions
from train.encoder import load_encoder
from pipeline.core.io import atomic_write
from pipeline.core.log import get_logger, progress

log = get_logger(__name__)


@dataclasses.dataclass(kw_only=True)
class ClipScoreConfig:
    model: str = "open_clip:ViT-B-32"
    threshold: float | None = None  # keep cosine >= threshold
    fraction: float | None = None  # or keep this top fraction of the whole dataset
    batch_size: int = 256
    workers: int = 2  # DataLoader processes decoding and preprocessing
    device: str = "cpu"

    def validate(self) -> None:
        if self.threshold is not None and self.fraction is not None:
            raise ValueError("set threshold or fraction, not both")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")


class PartBatches(torch.utils.data.IterableDataset):
    """Batches of one part at a time, parts split over DataLoader workers; a part's last batch says so."""

    def __init__(self, parts: list[int], samples_of, preprocess, batch_size: int):
        self.parts, self.samples_of, self.preprocess, self.batch_size = parts, samples_of, preprocess, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        mine = self.parts[info.id :: info.num_workers] if info else self.parts
        for part in mine:
            batch: list[dict] = []
            for sample in self.samples_of(part):
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield self._collate(part, batch, last=False)
                    batch = []
            yield self._collate(part, batch, last=True)

    def _collate(self, part: int, batch: list[dict], last: bool) -> dict:
        images = [self.preprocess(Image.open(io.BytesIO(s["image"])).convert("RGB")) for s in batch]
        return {"part": part, "last": last, "rows": [s["row"] for s in batch], "captions": [s["caption"] for s in batch],
                "images": torch.stack(images) if images else torch.empty(0)}


@STEPS.register("clip_score")
class ClipScore(Step):
    Config = ClipScoreConfig
    has_dataset_phase = True

    def run_shards(self, parts: Iterable[int], samples_of) -> Iterator[tuple[int, pa.Table]]:
        parts = list(parts)
        if not parts:
            return
        cfg = self.cfg
        encoder = load_encoder(cfg.model, cfg.device)
        batches = PartBatches(parts, samples_of, encoder.preprocess, cfg.batch_size)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=min(cfg.workers, len(parts)))
        pending: dict[int, list] = {}
        for batch in progress(loader, desc="clip score", unit="batch"):
            if batch["rows"]:
                image = encoder.embed_images(batch["images"].to(cfg.device)).cpu()  # (B, D), unit norm
                text = encoder.embed_texts(batch["captions"]).cpu()  # (B, D)
                pending.setdefault(batch["part"], []).append((batch["rows"], image, text))
            if batch["last"]:
                yield batch["part"], self._finish(batch["part"], pending.pop(batch["part"], []))

    def _finish(self, part: int, chunks: list) -> pa.Table:
        rows = [r for chunk in chunks for r in chunk[0]]
        image = torch.cat([c[1] for c in chunks]) if chunks else torch.empty(0, 0)
        text = torch.cat([c[2] for c in chunks]) if chunks else torch.empty(0, 0)
        for kind, emb in (("image", image), ("text", text)):
            with atomic_write(self.context.layout.step(self.context.name, part, f".{kind}.npy")) as f:
                np.save(f, emb.numpy().astype(np.float16))
        scores = (image * text).sum(-1).numpy() if rows else np.zeros(0, np.float32)
        return decisions(rows, [""] * len(rows), clip_score=pa.array(scores, pa.float32()))

    def dataset(self, table: pa.Table) -> list[str]:
        scores = table["clip_score"].to_numpy()
        if self.cfg.fraction is not None:
            keep = math.ceil(self.cfg.fraction * len(scores))
            order = np.lexsort((table["row"].to_numpy(), -scores))  # best first; ties by input order
            kept = np.zeros(len(scores), bool)
            kept[order[:keep]] = True
            cut = scores[order[keep - 1]] if keep else float("inf")
            log.info("clip_score: top %.1f%% of %d samples -> threshold %.4f", 100 * self.cfg.fraction, len(scores), cut)
        elif self.cfg.threshold is not None:
            kept = scores >= self.cfg.threshold
        else:
            kept = np.ones(len(scores), bool)
        return ["" if k else "low_clip_score" for k in kept]
