"""Embedding a dataset with the work split across ranks.

Every rank embeds its own slice (images: sample index % world == rank; texts: the same
rule over the prompt or caption list), then all ranks gather the slices back into dataset
order. No rank waits at a barrier while another embeds everything, and the gathered
features are identical on every rank, so every rank can compute the metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch
import torch.distributed as dist

from train.encoder import Encoder
from pipeline.evaluation.datasets import EvalSet
from pipeline.core.log import get_logger, progress
from train.gather import all_gather_no_grad, world

log = get_logger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gather_rows(local: torch.Tensor, indices: torch.Tensor, total: int) -> torch.Tensor:
    """(n_rank, ...) rows with their (n_rank,) dataset indices on each rank -> (total, ...) in order."""
    _, world_size = world()
    if world_size > 1:  # all_gather needs equal shapes: pad every rank to the largest slice
        sizes = gather_objects([(len(indices), tuple(local.shape[1:]))])
        rows, shape = max(sizes)
        padded = local.new_zeros((rows, *shape))
        if len(indices):  # a rank may own no rows at all; it still joins the gather
            padded[: len(indices)] = local
        padded_indices = torch.full((rows,), -1, dtype=torch.long, device=local.device)
        padded_indices[: len(indices)] = indices
        local, indices = all_gather_no_grad(padded), all_gather_no_grad(padded_indices)
    keep = indices >= 0
    out = local.new_empty((total, *local.shape[1:]))
    out[indices[keep].long()] = local[keep]
    if int(keep.sum()) != total:
        raise RuntimeError(f"gathered {int(keep.sum())} rows, expected {total}")
    return out


def gather_objects(local: list[Any]) -> list[Any]:
    """Per-rank python lists -> their concatenation in rank order, on every rank."""
    _, world_size = world()
    if world_size == 1:
        return list(local)
    parts: list[list[Any]] = [[] for _ in range(world_size)]
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


@dataclasses.dataclass
class EvalContext:
    """What a task gets: the model, the data, and cached, gathered image outputs."""

    encoder: Encoder
    data: EvalSet
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 64
    _images: dict[str, Any] | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.encoder.model

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = DTYPES[self.precision]
        return torch.autocast(torch.device(self.device).type, dtype=dtype, enabled=dtype != torch.float32)

    def images(self) -> dict[str, Any]:
        """``features`` (N, D) normalised, ``records`` (N dicts without images), and ``tokens``
        (N, T, W) for models with an ITM head; embedded once and shared by all tasks."""
        if self._images is None:
            heads = {"features": self.encoder.embed_images}
            if hasattr(self.model, "itm_score"):
                heads["tokens"] = lambda images: self.model.image_tokens(images).float()
            self._images = self._embed_images(heads)
        return self._images

    @torch.no_grad()
    def _embed_images(self, heads: dict[str, Callable]) -> dict[str, Any]:
        rank, world_size = world()
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in heads}
        indices, records = [], []

        def flush(batch: list[torch.Tensor]) -> None:
            images = torch.stack(batch).to(self.device)
            with self.autocast():
                for name, head in heads.items():
                    outputs[name].append(head(images))
            batch.clear()

        batch: list[torch.Tensor] = []
        for index, record in progress(self.data.shard(rank, world_size), desc="embed images"):
            batch.append(self.encoder.preprocess(record.pop("image")))
            indices.append(index)
            records.append(record)
            if len(batch) == self.batch_size:
                flush(batch)
        if batch:
            flush(batch)
        # the slices interleave (index % world == rank): put the records back in dataset order
        records = [record for _, record in sorted(gather_objects(list(zip(indices, records))), key=lambda p: p[0])]
        index = torch.tensor(indices, dtype=torch.long)
        gathered = {name: gather_rows(_cat(parts, self.device), index, len(records)).cpu() for name, parts in outputs.items()}
        log.info("embedded %d images on %d rank(s)", len(records), world_size)
        return {"records": records, **gathered}

    @torch.no_grad()
    def tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.encoder.tokenize(texts).items()}

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), D) normalised text embeddings, this rank embedding every world_size-th text."""
        rank, world_size = world()
        mine = list(range(rank, len(texts), world_size))
        parts = []
        for start in progress(range(0, len(mine), self.batch_size), desc="embed texts"):
            chunk = [texts[i] for i in mine[start : start + self.batch_size]]
            with self.autocast():
                parts.append(self.encoder.embed_texts(chunk))
        return gather_rows(_cat(parts, self.device), torch.tensor(mine, dtype=torch.long), len(texts)).cpu()


def _cat(parts: list[torch.Tensor], device: str) -> torch.Tensor:
    # a rank may own no samples at all (tiny sets, many ranks); it still joins the gather
    return torch.cat(parts) if parts else torch.zeros((0, 0), device=device)
