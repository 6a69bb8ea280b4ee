"""Where every stage of the data pipeline reads and writes, and the shard readers and writers.

    OUT/input/{part}.parquet        prepared rows of the URL list (pipeline.sources)
    OUT/download/{part}.tar|.parquet|_stats.json   img2dataset's output, one shard per part;
                                    ``_stats.json`` is moved in last, so it marks a complete shard
    OUT/steps/{step}/{part}.parquet a curation step's per-shard decisions and features
    OUT/steps/{step}/decisions/{part}.parquet   its dataset-wide decisions: the part's rows it drops
    OUT/steps/{step}/..., OUT/reshard/...   the dataset-wide phases' partitioned intermediates
    OUT/shards/{shard}.tar, sizes.json, manifest.parquet, stats.json, config.yaml   the result

Tar member names are only ever used as dictionary keys, never as file paths.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Iterable, Iterator

from pipeline.core.io import atomic_write

# Image members of a sample, by extension, in the order a reader looks for them (every stage).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
# PIL's format name -> the extension an output shard stores those bytes under (as served, not re-encoded:
# an animated GIF stays a .gif, and readers decode its first frame). Other formats are not kept.
FORMAT_EXTENSIONS = {"jpeg": "jpg", "mpo": "jpg", "png": "png", "webp": "webp", "bmp": "bmp", "gif": "gif"}


class Layout:
    def __init__(self, root: str):
        self.root = str(root).rstrip("/")

    @property
    def input_index(self) -> str:
        return f"{self.root}/input/index.json"

    def input_part(self, part: int) -> str:
        return f"{self.root}/input/{part:06d}.parquet"

    def download(self, part: int, suffix: str) -> str:
        return f"{self.root}/download/{part:06d}{suffix}"

    def step(self, name: str, part: int, suffix: str = ".parquet") -> str:
        return f"{self.root}/steps/{name}/{part:06d}{suffix}"

    def decisions(self, name: str, part: int) -> str:
        return f"{self.root}/steps/{name}/decisions/{part:06d}.parquet"

    def shard(self, index: int) -> str:
        return f"{self.root}/shards/{index:06d}.tar"

    def at_root(self, name: str) -> str:
        """The result files: sizes.json, manifest.parquet, stats.json, config.yaml, reshard_plan.parquet."""
        return f"{self.root}/{name}"


# ---------------------------------------------------------------------------- samples


def samples(tar_path: str, handler=None) -> Iterator[dict]:
    """Samples of one downloaded shard: {"row", "uid", "image" (bytes), "caption", "meta", "key"};
    ``handler`` (a webdataset exception handler) defaults to re-raising."""
    import webdataset as wds  # imports torch: only the phases that read shards pay for it

    pipeline = wds.DataPipeline(
        wds.SimpleShardList([tar_path]),
        wds.tarfile_to_samples(handler=handler or wds.reraise_exception),  # a stream of {"__key__", "jpg", "txt", "json"}
        wds.map(_as_sample),
    )
    yield from pipeline


def _as_sample(raw: dict) -> dict:
    meta = json.loads(raw["json"])
    image = next((raw[k] for k in IMAGE_EXTENSIONS if k in raw), None)
    return {"row": int(meta["row"]), "uid": meta["uid"], "image": image, "caption": raw.get("txt", b"").decode("utf-8"),
            "meta": meta, "key": raw["__key__"]}


def alive(records: Iterable[dict], rows: set[int]) -> Iterator[dict]:
    """Keep the records whose row is still in the running (not dropped by an earlier step)."""
    return (r for r in records if r["row"] in rows)


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> int:
    """Write (name, data) members to ``path`` atomically; returns the number of members."""
    count = 0
    with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed mtime: identical reruns give identical bytes
            tar.addfile(info, io.BytesIO(data))
            count += 1
    return count
