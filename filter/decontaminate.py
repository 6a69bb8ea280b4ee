"""Decontamination: drop training images that show a picture of an evaluation set (-> eval_copy).

The evaluation set is a built-in name (``fashion_mnist_test``: the embedded zero-shot benchmark)
or a path: a folder of images or of WebDataset shards. Matching is the pixel-level near-duplicate
test of filter/near_dup.py (re-encoded, resized, shifted or mirrored copies), against every
evaluation image, so it is decided shard by shard.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image

from filter import STEPS, Step, decisions
from filter.near_dup import PixelMatchConfig, matching_pairs, thumbnail
from pipeline.core.log import get_logger
from pipeline.core.registry import Registry
from pipeline.core.shards import IMAGE_EXTENSIONS

log = get_logger(__name__)
EVAL_SETS: Registry = Registry("evaluation set")


@dataclasses.dataclass(kw_only=True)
class DecontaminateConfig:
    eval_sets: list[str] = dataclasses.field(default_factory=lambda: ["fashion_mnist_test"])  # names or paths
    pixel: PixelMatchConfig = dataclasses.field(default_factory=PixelMatchConfig)


@EVAL_SETS.register("fashion_mnist_test")
def _fashion_mnist_test() -> Iterator[Image.Image]:
    from pipeline.embedded import fashion_mnist_test

    images, _ = fashion_mnist_test()
    return (Image.fromarray(a) for a in images)


def _from_path(path: str) -> Iterator[Image.Image]:
    """Images of a folder: image files, or the image members of .tar shards (read in memory)."""
    import webdataset as wds

    fs, root = fsspec.core.url_to_fs(path)
    for name in sorted(fs.find(root)):
        if name.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            yield Image.open(io.BytesIO(fs.cat(name)))
        elif name.endswith(".tar"):
            for sample in wds.DataPipeline(wds.SimpleShardList([fs.unstrip_protocol(name)]), wds.tarfile_to_samples()):
                data = next((sample[k] for k in IMAGE_EXTENSIONS if k in sample), None)
                if data is not None:
                    yield Image.open(io.BytesIO(data))


def eval_images(name: str) -> Iterator[Image.Image]:
    return EVAL_SETS.get(name)() if name in EVAL_SETS else _from_path(name)


@STEPS.register("decontaminate")
class Decontaminate(Step):
    Config = DecontaminateConfig
    _eval_thumbs: np.ndarray | None = None

    def eval_thumbs(self) -> np.ndarray:
        if self._eval_thumbs is None:
            thumbs = [thumbnail(image, self.cfg.pixel) for name in self.cfg.eval_sets for image in eval_images(name)]
            if not thumbs:
                raise ValueError(f"decontaminate: no images in eval_sets {self.cfg.eval_sets}")
            self._eval_thumbs = np.stack(thumbs)
            log.info("decontaminate: %d evaluation images from %s", len(thumbs), self.cfg.eval_sets)
        return self._eval_thumbs

    def shard(self, part: int, samples: Iterator[dict]) -> pa.Table:
        batch = list(samples)
        rows = [s["row"] for s in batch]
        if not batch:
            return decisions(rows, [])
        thumbs = np.stack([thumbnail(s["image"], self.cfg.pixel) for s in batch])
        copies = set(matching_pairs(thumbs, self.eval_thumbs(), self.cfg.pixel, exclude_self=False)[:, 0].tolist())
        return decisions(rows, ["eval_copy" if i in copies else "" for i in range(len(batch))])
