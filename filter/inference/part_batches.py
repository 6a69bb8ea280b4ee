"""A DataLoader dataset of image-caption batches, one downloaded part at a time (clip_score's inference input)."""

from __future__ import annotations

import io
from typing import Iterator

import torch
from PIL import Image


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
