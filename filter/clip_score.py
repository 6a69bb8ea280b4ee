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
import math
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from filter import STEPS, Phase, Step, decisions, dropped
from pipeline.core.io import atomic_write, exists, read_json, read_parquet, write_json, write_parquet
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


@STEPS.register("clip_score")
class ClipScore(Step):
    Config = ClipScoreConfig
    has_dataset_phase = True

    def run_shards(self, parts: Iterable[int], samples_of) -> Iterator[tuple[int, pa.Table]]:
        parts = list(parts)
        if not parts:
            return
        import torch  # the scoring phase alone needs torch and the model code: the cut's tasks start without them

        from filter.inference.part_batches import PartBatches
        from train.encoder import load_encoder

        cfg = self.cfg
        encoder = load_encoder(cfg.model, cfg.device)
        batches = PartBatches(parts, samples_of, encoder.preprocess, cfg.batch_size)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=min(cfg.workers, len(parts)))
        pending: dict[int, list] = {}
        for batch in progress(loader, desc="clip score", unit="batch"):
            if batch["rows"]:
                image = encoder.embed_images(batch["images"].to(cfg.device)).cpu()  # (B, D), unit norm
                text = encoder.embed_texts(batch["captions"]).cpu()  # (B, D)
                score = (image * text).sum(-1)
                pending.setdefault(batch["part"], []).append((batch["rows"], *(t.numpy() for t in (image, text, score))))
            if batch["last"]:
                yield batch["part"], self._finish(batch["part"], pending.pop(batch["part"], []))

    def _finish(self, part: int, chunks: list) -> pa.Table:
        rows = [r for chunk in chunks for r in chunk[0]]
        image = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0, 0), np.float32)
        text = np.concatenate([c[2] for c in chunks]) if chunks else np.zeros((0, 0), np.float32)
        for kind, emb in (("image", image), ("text", text)):
            with atomic_write(self.context.layout.step(self.context.name, part, f".{kind}.npy")) as f:
                np.save(f, emb.astype(np.float16))
        scores = np.concatenate([c[3] for c in chunks]) if chunks else np.zeros(0, np.float32)
        return decisions(rows, [""] * len(rows), clip_score=pa.array(scores, pa.float32()))

    # ------------------------------------------------------------------ the dataset-wide cut

    def phases(self) -> list[Phase]:
        name, parts = self.context.name, self.context.parts
        if self.cfg.fraction is None:
            return [Phase(f"{name}/decide", "part", parts, self.decide)]
        return [Phase(f"{name}/histogram", "part", parts, self.histogram), Phase(f"{name}/bin", "once", 1, self.find_bin),
                Phase(f"{name}/candidates", "part", parts, self.candidates), Phase(f"{name}/cut", "once", 1, self.find_cut),
                Phase(f"{name}/decide", "part", parts, self.decide)]

    def _path(self, what: str) -> str:
        return f"{self.context.layout.root}/steps/{self.context.name}/cut/{what}"

    def _ranks(self, part: int) -> tuple[np.ndarray, np.ndarray]:
        """(row, rank) of the part's samples; ranks sort best score first (a uint32 per float32 score)."""
        table = read_parquet(self.context.layout.step(self.context.name, part), ["row", "clip_score"])
        return table["row"].to_numpy(), descending_rank(table["clip_score"].to_numpy())

    def histogram(self, part: int) -> None:
        """Pass 1: counts of the part's ranks by their high bits."""
        path = self._path(f"histogram/{part:06d}.parquet")
        if not exists(path):
            bins, counts = np.unique(self._ranks(part)[1] >> RANK_LOW_BITS, return_counts=True)
            write_parquet(path, pa.table({"bin": bins.astype(np.int64), "count": counts.astype(np.int64)}))

    def find_bin(self, _: int = 0) -> None:
        """The bin holding the last kept sample, and how many of that bin's samples are kept."""
        if exists(self._path("bin.json")):
            return
        total = np.zeros(1 << (32 - RANK_LOW_BITS), np.int64)
        for part in range(self.context.parts):
            table = read_parquet(self._path(f"histogram/{part:06d}.parquet"))
            np.add.at(total, table["bin"].to_numpy(), table["count"].to_numpy())
        n = int(total.sum())
        keep = math.ceil(self.cfg.fraction * n)
        before = np.cumsum(total) - total  # samples in better bins
        at = int(np.searchsorted(np.cumsum(total), keep)) if keep else -1
        write_json(self._path("bin.json"), {"samples": n, "keep": keep, "bin": at, "need": keep - int(before[at]) if keep else 0})

    def candidates(self, part: int) -> None:
        """Pass 2: the part's samples in that bin."""
        path = self._path(f"candidates/{part:06d}.parquet")
        if not exists(path):
            chosen = read_json(self._path("bin.json"))["bin"]
            rows, ranks = self._ranks(part)
            mine = (ranks >> RANK_LOW_BITS) == chosen
            write_parquet(path, pa.table({"rank": ranks[mine].astype(np.int64), "row": rows[mine]}))

    def find_cut(self, _: int = 0) -> None:
        """The last kept (rank, row): ties in score are kept in input order, as a sort of the whole pool would."""
        if exists(self._path("cut.json")):
            return
        chosen = read_json(self._path("bin.json"))
        cut = {"rank": -1, "row": -1}
        if chosen["keep"]:
            table = pa.concat_tables(read_parquet(self._path(f"candidates/{p:06d}.parquet")) for p in range(self.context.parts))
            last = table.sort_by([("rank", "ascending"), ("row", "ascending")]).slice(chosen["need"] - 1, 1).to_pylist()[0]
            cut = {"rank": last["rank"], "row": last["row"]}
            log.info("clip_score: top %.1f%% of %d samples -> threshold %.4f", 100 * self.cfg.fraction, chosen["samples"],
                     score_of_rank(cut["rank"]))
        write_json(self._path("cut.json"), cut)

    def decide(self, part: int) -> None:
        path = self.context.layout.decisions(self.context.name, part)
        if exists(path):
            return
        table = read_parquet(self.context.layout.step(self.context.name, part), ["row", "clip_score"])
        rows, scores = table["row"].to_numpy(), table["clip_score"].to_numpy()
        if self.cfg.fraction is not None:
            cut, ranks = read_json(self._path("cut.json")), descending_rank(scores).astype(np.int64)
            kept = (ranks < cut["rank"]) | ((ranks == cut["rank"]) & (rows <= cut["row"]))
        elif self.cfg.threshold is not None:
            kept = scores >= self.cfg.threshold
        else:
            kept = np.ones(len(rows), bool)
        order = np.argsort(rows[~kept], kind="stable")
        write_parquet(path, dropped(rows[~kept][order], ["low_clip_score"] * int((~kept).sum())))


RANK_LOW_BITS = 12  # pass 1 counts ranks by their top 20 bits: about 1e-4 of the score range per bin


def descending_rank(scores: np.ndarray) -> np.ndarray:
    """(n,) uint32 that sorts float32 scores best first (-0.0 ranks as 0.0)."""
    bits = (np.asarray(scores, np.float32) + np.float32(0.0)).view(np.uint32)
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))
    return ~ascending


def score_of_rank(rank: int) -> float:
    ascending = np.uint32(~np.uint32(rank))
    bits = ascending & np.uint32(0x7FFFFFFF) if ascending >> 31 else ~ascending
    return float(np.array([bits], np.uint32).view(np.float32)[0])
