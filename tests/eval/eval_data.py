"""Writers for real evaluation inputs: PNG images of palette colours, WebDataset tar shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

from eval_models import PALETTE


def colour_png(colour: str, size: int = 12, shade: int = 0) -> bytes:
    rgb = tuple(max(0, v - shade) for v in PALETTE[colour])
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
