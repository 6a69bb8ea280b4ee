"""Basic filters: is the image a real, decodable, reasonably shaped picture, is the caption usable.

Reasons: not_image, unsupported_format (decodable, but not a format the shards store, e.g. TIFF),
decompression_bomb, truncated, corrupt_image, too_small, aspect_ratio, empty_caption,
whitespace_caption, long_caption, short_caption, too_few_words, blocked_word, and ``not_<column>``
for a ``require_true`` column that is false (e.g. a trusted-source subset).
"""

from __future__ import annotations

import dataclasses
import io
import re
from typing import Iterator

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from filter import STEPS, Step, decisions
from pipeline.core.shards import FORMAT_EXTENSIONS


IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF", b"GIF8")


@dataclasses.dataclass(kw_only=True)
class BasicConfig:
    min_image_size: int = 0  # smaller side, pixels
    max_aspect_ratio: float = 3.0
    max_pixels: int = 89_478_485  # decompression bombs are refused before decoding
    min_caption_chars: int = 1
    max_caption_chars: int = 1000
    min_caption_words: int = 1
    blocklist: list[str] = dataclasses.field(default_factory=list)  # case-insensitive whole words
    require_true: list[str] = dataclasses.field(default_factory=list)  # input columns that must be true


def image_reason(data: bytes | None, cfg: BasicConfig) -> tuple[str, int, int, str]:
    """(reason, width, height, format) of the downloaded bytes, decoded as the trainer will decode them."""
    if not data:
        return "not_image", 0, 0, ""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # PIL's own hard limit, met before ours when max_pixels is large
        return "decompression_bomb", 0, 0, ""
    except (UnidentifiedImageError, OSError):  # an image signature whose header does not parse is cut short
        return ("truncated" if data.startswith(IMAGE_SIGNATURES) else "not_image"), 0, 0, ""
    width, height = image.size  # header only, nothing decoded yet
    fmt = (image.format or "").lower()
    if width * height > cfg.max_pixels:  # a bomb is refused before it is decompressed
        return "decompression_bomb", width, height, fmt
    try:
        image.load()
    except OSError as err:
        return ("truncated" if "truncated" in str(err) else "corrupt_image"), width, height, fmt
    except Exception:  # noqa: BLE001  (a decoder may raise anything on a corrupt file)
        return "corrupt_image", width, height, fmt
    if fmt not in FORMAT_EXTENSIONS:
        return "unsupported_format", width, height, fmt
    if min(width, height) < cfg.min_image_size:
        return "too_small", width, height, fmt
    if max(width, height) / max(1, min(width, height)) > cfg.max_aspect_ratio:
        return "aspect_ratio", width, height, fmt
    return "", width, height, fmt


def caption_reason(caption: str, cfg: BasicConfig, blocked: re.Pattern | None) -> str:
    if caption == "":
        return "empty_caption"
    if not caption.strip():
        return "whitespace_caption"
    if len(caption) > cfg.max_caption_chars:
        return "long_caption"
    if len(caption.strip()) < cfg.min_caption_chars:
        return "short_caption"
    if len(caption.split()) < cfg.min_caption_words:
        return "too_few_words"
    if blocked is not None and blocked.search(caption):
        return "blocked_word"
    return ""


@STEPS.register("basic")
class BasicFilter(Step):
    Config = BasicConfig

    def shard(self, part: int, samples: Iterator[dict]) -> pa.Table:
        cfg = self.cfg
        words = [re.escape(w) for w in cfg.blocklist]
        blocked = re.compile(rf"\b({'|'.join(words)})\b", re.IGNORECASE) if words else None
        out = {"row": [], "reason": [], "width": [], "height": [], "format": []}
        for sample in samples:
            reason, width, height, fmt = image_reason(sample["image"], cfg)
            reason = (
                caption_reason(sample["caption"], cfg, blocked)
                or next((f"not_{c}" for c in cfg.require_true if not sample["meta"].get(c)), "")
                or reason
            )
            for key, value in zip(out, (sample["row"], reason, width, height, fmt)):
                out[key].append(value)
        return decisions(out.pop("row"), out.pop("reason"), **out)
