"""Evaluation datasets: where images and their targets come from, and their class names/prompts.

A dataset is a registered source of records (``{"key", "image", "label"}`` or ``{"key",
"image", "captions"}``, image still encoded) chosen by ``dataset.name`` in the config:

- ``fashion_mnist_test``: the embedded Fashion-MNIST test split (``pipeline.embedded``).
- ``wds``: WebDataset shards, with a class index (``cls``) and/or captions (``txt``, one per line).
- ``image_folder``: ``root/<class name>/<image>``, classes in sorted folder order.

:meth:`EvalSet.shard` composes the record stream with small stages (limit, rank slice,
decode) so each rank decodes only the samples it embeds. Class names and prompt templates
are config values: a list, the name of a built-in set, or a text file with one per line.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from pipeline.core.config import Section
from pipeline.core.registry import Registry
from pipeline.core.shards import IMAGE_EXTENSIONS

DATASETS: Registry = Registry("eval dataset")
CLASSNAME_SETS: Registry = Registry("class name set")
TEMPLATE_SETS: Registry = Registry("prompt template set")


@dataclasses.dataclass(kw_only=True)
class DatasetConfig(Section):
    """The keys of the named dataset's ``Config`` (a subclass of this one)."""

    registry = DATASETS
    tag: str = ""  # the dataset's name in results and file names (default: `name`)
    start: int = 0  # skip the first N samples (e.g. the ones a test model was trained on)
    limit: int = 0  # evaluate only N samples from `start` (0: all of them)
    classnames: str | list[str] = ""  # a list, a built-in set (fashion_mnist, imagenet) or a file
    templates: str | list[str] = "plain"  # prompts with a "{c}" placeholder: list, set (openai_imagenet) or file


# ---------------------------------------------------------------------------- sources


@DATASETS.register("fashion_mnist_test")
class FashionMnistTest:
    """The embedded Fashion-MNIST test split: 10,000 28x28 greyscale images, 10 classes."""

    @dataclasses.dataclass(kw_only=True)
    class Config(DatasetConfig):
        classnames: str | list[str] = "fashion_mnist"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def records(self) -> Iterator[dict]:
        from pipeline.embedded import fashion_mnist_test

        images, labels = fashion_mnist_test()
        for i, (image, label) in enumerate(zip(images, labels)):
            yield {"key": f"{i:05d}", "image": image, "label": int(label)}


@DATASETS.register("wds")
class WebDatasetShards:
    """WebDataset shards in order (no shuffling): an image plus a class index and/or captions."""

    @dataclasses.dataclass(kw_only=True)
    class Config(DatasetConfig):
        urls: str  # brace pattern or path, e.g. /data/eval/{00000..00003}.tar
        image_key: str = ";".join(IMAGE_EXTENSIONS)
        label_key: str = "cls"
        caption_key: str = "txt"  # one caption per line; several lines = several captions

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def records(self) -> Iterator[dict]:
        import webdataset as wds

        # every rank reads every shard and keeps its own slice of samples (EvalSet.shard), so
        # the split is exact whatever the number of shards; decoding happens after the split
        pipeline = wds.DataPipeline(wds.SimpleShardList(self.cfg.urls), wds.tarfile_to_samples())
        for sample in pipeline:
            yield self._record(sample)

    def _record(self, sample: dict) -> dict:
        where = f"sample {sample['__key__']!r} of {sample['__url__']}"
        image_key = next((k for k in self.cfg.image_key.split(";") if k in sample), None)
        if image_key is None:
            raise ValueError(f"{where} has no image (looked for {self.cfg.image_key})")
        record: dict[str, Any] = {"key": f"{sample['__url__']}/{sample['__key__']}", "image": sample[image_key]}
        if self.cfg.label_key in sample:
            record["label"] = int(sample[self.cfg.label_key].decode().strip())
        if self.cfg.caption_key in sample:
            captions = [c.strip() for c in sample[self.cfg.caption_key].decode().splitlines() if c.strip()]
            if not captions:
                raise ValueError(f"{where} has an empty caption")
            record["captions"] = captions
        return record


@DATASETS.register("image_folder")
class ImageFolder:
    """``root/<class>/<image>``; without configured class names, the folder names are the class names."""

    @dataclasses.dataclass(kw_only=True)
    class Config(DatasetConfig):
        root: str

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.folders = sorted(p for p in Path(cfg.root).iterdir() if p.is_dir())
        if not self.folders:
            raise ValueError(f"image_folder: no class folders under {cfg.root}")

    def default_classnames(self) -> list[str]:
        return [p.name.replace("_", " ") for p in self.folders]

    def records(self) -> Iterator[dict]:
        for label, folder in enumerate(self.folders):
            for path in sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS):
                yield {"key": str(path.relative_to(self.cfg.root)), "image": path.read_bytes(), "label": label}


# ---------------------------------------------------------------------------- class names and templates


TEMPLATE_SETS.register("plain", lambda: ["{c}"])


@CLASSNAME_SETS.register("fashion_mnist")
def _fashion_mnist_classnames() -> list[str]:
    from pipeline.embedded import CLASSNAMES

    return list(CLASSNAMES)


@CLASSNAME_SETS.register("imagenet")
def _imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


@TEMPLATE_SETS.register("openai_imagenet")
def _openai_imagenet_templates() -> list[str]:
    """The 80 prompts of the CLIP paper (open_clip ships them as functions of the class name)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]


def _resolve_list(value: str | list[str], sets: Registry, what: str) -> list[str]:
    if isinstance(value, list):
        return value
    if value in sets:
        return sets.build(value)
    if Path(value).is_file():
        return [line.strip() for line in Path(value).read_text().splitlines() if line.strip()]
    raise ValueError(f"{what} {value!r} is neither a built-in set ({', '.join(sets.names())}) nor a file")


# ---------------------------------------------------------------------------- the dataset as tasks see it


class EvalSet:
    def __init__(self, cfg: DatasetConfig):
        self.cfg = cfg
        self.source = DATASETS.get(cfg.name)(cfg)

    @property
    def classnames(self) -> list[str]:
        if not self.cfg.classnames and hasattr(self.source, "default_classnames"):
            return self.source.default_classnames()
        if not self.cfg.classnames:
            raise ValueError(f"dataset {self.cfg.name!r} needs dataset.classnames for classification")
        return _resolve_list(self.cfg.classnames, CLASSNAME_SETS, "class name set")

    @property
    def templates(self) -> list[str]:
        templates = _resolve_list(self.cfg.templates, TEMPLATE_SETS, "template set")
        if bad := [t for t in templates if "{c}" not in t]:
            raise ValueError(f"prompt templates must contain '{{c}}': {bad}")
        return templates

    def shard(self, rank: int, world_size: int) -> Iterator[tuple[int, dict]]:
        """(index, record with a decoded RGB PIL image) for this rank's samples: index % world == rank."""
        stop = self.cfg.start + self.cfg.limit if self.cfg.limit else None
        records = itertools.islice(self.source.records(), self.cfg.start, stop)
        return decode(rank_slice(records, rank, world_size))


def rank_slice(records: Iterator[dict], rank: int, world_size: int) -> Iterator[tuple[int, dict]]:
    """records -> (index, record) of every world_size-th record starting at rank (nothing decoded)."""
    for index, record in enumerate(records):
        if index % world_size == rank:
            yield index, record


def decode(items: Iterator[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    """(index, record with encoded bytes or a uint8 array) -> (index, record with an RGB PIL image)."""
    for index, record in items:
        raw = record["image"]
        try:
            image = Image.fromarray(raw) if isinstance(raw, np.ndarray) else Image.open(io.BytesIO(raw))
            record["image"] = image.convert("RGB")
        except Exception as err:
            raise ValueError(f"cannot decode the image of {record['key']}: {err}") from err
        yield index, record
