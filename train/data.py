"""The training data path: WebDataset shards -> augmented, tokenized batches, resumable mid-epoch.

One worker's stream is a ``webdataset.DataPipeline`` of small generator stages::

    shard_order    {"url"} in an order seeded by (seed, epoch, pass), split by node then worker
    url_opener, tar_file_expander, group_by_keys     (webdataset) -> raw samples {"__key__", "jpg", "txt"}
    complete       drop (and count) samples without an image, a needed caption or a configured image id
    shuffle        sample buffer seeded by (seed, epoch, stream)
    skip           resume: drop the samples this stream consumed before the checkpoint, undecoded
    decode         PIL (JPEG draft mode when larger than needed) + the named transform, seeded per sample
    batch          stack, tokenize captions, attach the stream position and skip counts

Every stream (rank x worker) yields exactly ``batches_per_stream`` batches per epoch (its
shards repeat if needed), so no rank waits at the end of an epoch. Resume is deterministic
replay: the same order is rebuilt and consumed samples are skipped before decoding.

An epoch's streams are numbered globally, ``g = rank + world * worker`` of its layout (world,
workers); the checkpoint keeps that layout and each stream's position. A resume on another
world size finishes the interrupted epoch with the saved streams dealt out again (rank r reads
the streams ``g % world == r``, each worker a share of those), so across the interruption the
epoch reads exactly the samples an uninterrupted one reads; later epochs use the new layout. When the saved
streams cannot be dealt out evenly (their count is not a multiple of the new world size), the
run says so and starts at the next epoch.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import random
import tarfile
import zlib
from functools import partial
from typing import Callable, Iterator

import torch
import webdataset as wds
from webdataset.mix import round_robin_longest
from PIL import Image

from pipeline.core.io import exists, read_json
from pipeline.core.log import get_logger
from pipeline.core.shards import IMAGE_EXTENSIONS
from train import tokenizers
from train.config import DataConfig
from train.contract import DataContract
from train.transforms import TRANSFORMS

log = get_logger(__name__)


# ---------------------------------------------------------------------------- shards


def shard_list(path: str, num_samples: int = 0) -> tuple[list[str], int]:
    """(shard urls, samples per epoch) of a shard directory (sizes.json) or a brace pattern."""
    if path.endswith(".tar") or "{" in path:
        if num_samples <= 0:
            raise ValueError(f"data.num_samples is required with a shard pattern ({path})")
        return list(wds.shardlists.expand_urls(path)), num_samples
    sizes_file = f"{path.rstrip('/')}/sizes.json"
    if not exists(sizes_file):
        raise ValueError(f"{path} is neither a shard pattern nor a directory with sizes.json")
    sizes = read_json(sizes_file)
    return [f"{path.rstrip('/')}/{name}" for name in sorted(sizes)], num_samples or sum(sizes.values())


def sample_id(key: str) -> int:
    """A stable 63-bit id of a sample key (same on every machine and run)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


# Every reason a sample can be skipped, in a fixed order: the metrics reduce one count per reason
# over the ranks, and a collective must have the same shape on every rank whatever its data was.
SKIP_REASONS = ("truncated_tar", "missing_image", "missing_caption", "missing_image_id", "decode_bomb",
                "corrupt_image")


class SkipCounter:
    """Counts skipped input by reason (one of :data:`SKIP_REASONS`)."""

    def __init__(self, counts: dict[str, int] | None = None, muted: bool = False):
        self.counts: collections.Counter = collections.Counter(counts or {})
        self.muted = muted  # while replaying to a resume position whose counts are already known
        self.read = 0  # raw samples read, to notice shards that hold none

    def skip(self, reason: str) -> None:
        assert reason in SKIP_REASONS, reason
        if not self.muted:
            self.counts[reason] += 1



# ---------------------------------------------------------------------------- stages


def shard_order(shards: list[str], seed: int, epoch: int, rank: int, world: int, worker: int, workers: int,
                counter: SkipCounter) -> Iterator[dict]:
    """Endless passes over this stream's shards: all ranks shuffle alike, split by node, then by worker."""
    for repeat in itertools.count():
        order = list(shards)
        random.Random(_seed(seed, epoch, repeat)).shuffle(order)
        read_before = counter.read
        yield from ({"url": url} for url in order[rank::world][worker::workers])
        if counter.read == read_before:
            raise ValueError(f"no readable sample in {order[rank::world][worker::workers]} (rank {rank}, worker {worker})")


def resampled_order(sources: list[tuple[list[str], float]], seed: int) -> Iterator[dict]:
    """Endless shards drawn with replacement: a source by weight, then a shard of it uniformly."""
    rng = random.Random(seed)
    weights = [weight for _, weight in sources]
    while True:
        shards, _ = rng.choices(sources, weights)[0]
        yield {"url": rng.choice(shards)}


def expand(sources: Iterator[dict], counter: SkipCounter) -> Iterator[dict]:
    """Opened shards {"url", "stream"} -> tar members {"fname", "data", "__url__"}.

    A shard that breaks off (truncated, corrupt) ends there and is counted once; the members
    read before the break are kept.
    """
    for source in sources:
        try:
            for member in wds.tariterators.tar_file_iterator(source["stream"]):  # raises on a bad tar
                member["__url__"] = source["url"]
                yield member
        except (tarfile.TarError, EOFError, zlib.error) as err:
            counter.skip("truncated_tar")
            log.warning("skipping the rest of %s: %s", source["url"], err)
        finally:
            source["stream"].close()


def image_key(sample: dict, image_id_key: str) -> str | None:
    """What names the sample's image: its .json's ``image_id_key`` field, or with no key set the
    sample's own ``__key__`` (one caption per image); None when the .json lacks the field."""
    if not image_id_key:
        return sample["__key__"]
    try:
        value = json.loads(sample["json"]).get(image_id_key) if "json" in sample else None
    except (ValueError, AttributeError):  # not JSON, or not an object
        return None
    return None if value is None else str(value)


def complete(samples: Iterator[dict], counter: SkipCounter, text: bool, image_id_key: str) -> Iterator[dict]:
    """Samples with an image (a caption when needed, an image id when configured), ``__image__`` set to
    what names the image; others are counted."""
    for sample in samples:
        counter.read += 1
        if not any(ext in sample for ext in IMAGE_EXTENSIONS):
            counter.skip("missing_image")
        elif text and "txt" not in sample:
            counter.skip("missing_caption")
        elif (image := image_key(sample, image_id_key)) is None:
            counter.skip("missing_image_id")
        else:
            sample["__image__"] = image
            yield sample


def shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Buffer shuffle with an explicit RNG (reproducible, unlike webdataset's default)."""
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def skip(samples: Iterator[dict], count: int, counter: SkipCounter) -> Iterator[dict]:
    """Resume: drop the samples consumed before the checkpoint (undecoded), then count skips again."""
    for _ in itertools.islice(samples, count):
        pass
    counter.muted = False
    yield from samples


def number(samples: Iterator[dict], start: int) -> Iterator[dict]:
    """Tag each sample with its 1-based position in the stream (the resumable position)."""
    for position, sample in enumerate(samples, start=start + 1):
        sample["__position__"] = position
        yield sample


def decode_image(data: bytes, draft_size: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    if draft_size and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))  # DCT scaling: both sides stay >= draft_size
    return image.convert("RGB")


def decode(samples: Iterator[dict], transform: Callable, counter: SkipCounter, text: bool, draft_size: int,
           seed: int) -> Iterator[dict]:
    """Raw sample -> {"image" | views..., "caption", "sample_id", "image_id", "__position__"}; bad ones are counted."""
    for sample in samples:
        data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
        try:
            image = decode_image(data, draft_size)
        except Image.DecompressionBombError:
            counter.skip("decode_bomb")
            continue
        except (OSError, ValueError, SyntaxError):
            counter.skip("corrupt_image")
            continue
        # Augmentation randomness from the sample's place in the stream: replay-exact on resume.
        torch.default_generator.manual_seed(_seed(seed, sample["__position__"]) % 2**63)  # CPU only: cheap
        out = transform(image)
        if text:
            out["caption"] = sample["txt"].decode("utf-8", errors="replace").strip()
        out["sample_id"] = sample_id(sample["__key__"])  # the pair
        out["image_id"] = sample_id(sample["__image__"])  # its image, shared by every caption of it
        out["__position__"] = sample["__position__"]
        yield out


def batch(samples: Iterator[dict], size: int, tokenize: Callable | None, counter: SkipCounter,
          stream: int) -> Iterator[dict]:
    """Stack ``size`` samples; the batch carries the stream id, position and skip counts so far."""
    while chunk := list(itertools.islice(samples, size)):
        if len(chunk) < size:
            return
        out = {key: torch.stack([s[key] for s in chunk]) for key, value in chunk[0].items()
               if isinstance(value, torch.Tensor)}
        for key in ("sample_id", "image_id"):
            out[key] = torch.tensor([s[key] for s in chunk], dtype=torch.int64)
        if tokenize is not None:
            out.update(tokenize([s["caption"] for s in chunk]))
        out["__stream__"], out["__position__"] = stream, chunk[-1]["__position__"]
        out["__skips__"] = dict(counter.counts)
        yield out


# ---------------------------------------------------------------------------- streams and loader


class ShardStream(torch.utils.data.IterableDataset):
    """This rank's batches for one epoch; in each DataLoader worker, one stream of the rank."""

    def __init__(self, cfg: DataConfig, contract: DataContract, rank: int, world: int, seed: int):
        super().__init__()
        self.cfg, self.rank, self.world, self.seed = cfg, rank, world, seed
        self.workers = max(1, cfg.workers)
        self.shards, self.num_samples = shard_list(cfg.path, cfg.num_samples) if cfg.path else ([], 0)
        self.sources = [(self.shards, 1.0)] if cfg.path else []
        for source in cfg.sources:
            shards, count = shard_list(source.path, cfg.num_samples)
            self.sources.append((shards, source.weight))
            self.num_samples = self.num_samples or count
        self.batches_per_stream = self.num_samples // (world * self.workers * cfg.batch_size)
        self._check()
        self.transform = TRANSFORMS.build(cfg.transform, cfg, contract)
        self.tokenize = tokenizers.build(contract) if cfg.text else None  # once, before workers fork
        self.draft_size = math.ceil(contract.image_size / math.sqrt(cfg.crop_scale[0])) if cfg.draft else 0
        # Workers persist across epochs (forked once), so the epoch reaches them through shared
        # memory; the resume state they were forked with applies to its own epoch only.
        self._epoch = multiprocessing.RawValue("q", 0)
        self.resume_epoch, self.resume, self.resume_layout = -1, {}, self.layout

    def _check(self) -> None:
        streams = self.world * self.workers
        if not self.cfg.resampled and len(self.shards) < streams:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {self.world} ranks x {self.workers} workers = {streams} "
                f"streams; reshard into more shards, lower data.workers, or set data.resampled: true")
        if self.batches_per_stream < 1:
            raise ValueError(f"{self.num_samples} samples per epoch give no batch of {self.cfg.batch_size} "
                             f"to each of {streams} streams")

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @property
    def layout(self) -> tuple[int, int]:
        """(world, workers) of fresh epochs: the streams this run numbers."""
        return self.world, self.workers

    def set_epoch(self, epoch: int, resume: dict[int, dict], layout: tuple[int, int]) -> None:
        """Next epoch to iterate; ``resume`` maps stream -> {"position", "batches"} already consumed
        in streams numbered by ``layout`` (another run's when resumed on another world size)."""
        self._epoch.value = epoch
        if resume or tuple(layout) != self.layout:
            self.resume_epoch, self.resume, self.resume_layout = epoch, resume, tuple(layout)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        resumed = self.epoch == self.resume_epoch
        resume, layout = (self.resume, self.resume_layout) if resumed else ({}, self.layout)
        world, workers = layout
        streams = [g for g in range(world * workers) if g % self.world == self.rank]  # this rank's, by worker
        # After a mid-epoch resume, the first fresh worker continues the stream whose turn it was.
        offset = sum(state["batches"] for state in resume.values()) % self.workers
        mine = streams[(worker + offset) % self.workers::self.workers]
        per_stream = self.num_samples // (world * workers * self.cfg.batch_size)
        parts = []
        for stream in mine:
            state = resume.get(stream, {"position": 0, "batches": 0, "skips": {}})
            parts.append(itertools.islice(self.pipeline(stream, layout, state), per_stream - state["batches"]))
        return round_robin_longest(*parts)  # a worker reading several streams takes them in turn

    def pipeline(self, stream: int, layout: tuple[int, int], state: dict) -> wds.DataPipeline:
        cfg, position = self.cfg, state["position"]
        world, workers = layout
        rank, worker = stream % world, stream // world
        counter = SkipCounter(state["skips"], muted=position > 0)
        stream_seed = _seed(self.seed, self.epoch, rank, worker)
        if cfg.resampled:
            source = resampled_order(self.sources, _seed(stream_seed, "shards"))
        else:
            source = shard_order(self.shards, self.seed, self.epoch, rank, world, worker, workers, counter)
        return wds.DataPipeline(
            lambda: source,
            wds.tariterators.url_opener,  # an unreadable URL is a configuration error: it raises
            partial(expand, counter=counter),
            wds.tariterators.group_by_keys,
            partial(complete, counter=counter, text=cfg.text, image_id_key=cfg.image_id_key),
            partial(shuffle, size=cfg.shuffle_buffer, rng=random.Random(stream_seed)),
            partial(skip, count=position, counter=counter),
            partial(number, start=position),
            partial(decode, transform=self.transform, counter=counter, text=cfg.text, draft_size=self.draft_size,
                    seed=stream_seed),
            partial(batch, size=cfg.batch_size, tokenize=self.tokenize, counter=counter, stream=stream),
        )


class TrainLoader:
    """Endless batches for this rank, epoch after epoch, with a resumable position.

    A DataLoader yields its workers' batches round-robin, so the position is just: epoch,
    and per stream the samples consumed and batches delivered.
    """

    def __init__(self, cfg: DataConfig, contract: DataContract, rank: int, world: int, seed: int,
                 pin_memory: bool = False):
        self.dataset = ShardStream(cfg, contract, rank, world, seed)
        self.cfg, self.rank, self.world, self.pin_memory = cfg, rank, world, pin_memory  # pinned: async copies
        self.batches_per_epoch = self.dataset.batches_per_stream * self.dataset.workers
        self.epoch, self.streams, self.layout = 0, {}, self.dataset.layout  # layout of this epoch's streams
        self.skips_before: collections.Counter = collections.Counter()  # from finished epochs

    def __iter__(self) -> Iterator[dict]:
        # One set of workers for every epoch: forking a threaded process (gloo, OpenMP) each epoch
        # cost ~0.7 s per epoch, and is a suspect in an intermittent native crash of CPU ranks.
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.workers,
                                             prefetch_factor=4 if self.cfg.workers else None,
                                             persistent_workers=self.cfg.workers > 0, pin_memory=self.pin_memory)
        while True:
            # Workers fork, or resume, at iter(loader).
            self.dataset.set_epoch(self.epoch, dict(self.streams), self.layout)
            for item in loader:
                stream = item.pop("__stream__")
                self.streams[stream] = {"position": item.pop("__position__"), "skips": item.pop("__skips__"),
                                        "batches": self.streams.get(stream, {}).get("batches", 0) + 1}
                yield item
            self.skips_before.update(self.skips_this_epoch())
            self.epoch, self.streams, self.layout = self.epoch + 1, {}, self.dataset.layout

    def skips_this_epoch(self) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for state in self.streams.values():
            total.update(state["skips"])
        return total

    def skipped(self) -> dict[str, int]:
        """Skipped input so far, for every reason in :data:`SKIP_REASONS` (all epochs, this rank)."""
        counts = self.skips_before + self.skips_this_epoch()
        return {reason: counts[reason] for reason in SKIP_REASONS}

    def state_dict(self) -> dict:
        return copy.deepcopy({"epoch": self.epoch, "streams": self.streams, "layout": list(self.layout),
                              "skips_before": dict(self.skips_before)})

    def load_state_dict(self, state: dict) -> None:
        """This rank's state, saved by the same rank of a run of the same world size."""
        self.epoch, self.streams = state["epoch"], {int(k): v for k, v in state["streams"].items()}
        self.layout = tuple(state["layout"])
        self.skips_before = collections.Counter(state["skips_before"])

    def load_remapped(self, states: list[dict]) -> None:
        """Every rank's state of a run of another world size: this rank takes its share of the saved
        streams (exact), or, when they cannot be shared evenly, starts at the next epoch (logged)."""
        world, workers = states[0]["layout"]
        epochs = {state["epoch"] for state in states}
        # Skips are summed over ranks when logged: rank 0 carries the saved ranks' totals.
        self.skips_before = collections.Counter()
        if (world * workers) % self.world == 0 and len(epochs) == 1:
            self.epoch, self.layout, self.streams = epochs.pop(), (world, workers), {}
            for state in states:
                self.streams.update({int(g): v for g, v in state["streams"].items()
                                     if int(g) % self.world == self.rank})
                if self.rank == 0:
                    self.skips_before.update(state["skips_before"])
            log.info("resumed epoch %d of %d ranks x %d workers on %d ranks: this rank reads streams %s",
                     self.epoch, world, workers, self.world, sorted(self.streams) or "(none started yet)")
            return
        self.epoch, self.layout, self.streams = max(epochs) + 1, self.dataset.layout, {}
        if self.rank == 0:
            for state in states:
                self.skips_before.update(state["skips_before"])
                for stream in state["streams"].values():
                    self.skips_before.update(stream["skips"])
        log.warning("the checkpoint's %d data streams (%d ranks x %d workers) cannot be shared evenly by %d ranks: "
                    "the rest of epoch %d is skipped, training continues at the start of epoch %d",
                    world * workers, world, workers, self.world, max(epochs), self.epoch)
