"""Perceptual hashing with banded candidate search: near-duplicate photos among millions.

A 64-bit pHash is the sign pattern of the 8x8 lowest DCT frequencies of a 32x32 grey image
against their median. Copies that were re-encoded or resized keep nearly every bit; mirrored
copies match the hash of the mirrored image, which is kept beside it.

Comparing every pair is quadratic, so candidates come from bands: the 64 bits are cut into
``max_distance + 1`` bands, and by pigeonhole two hashes within ``max_distance`` bits agree
exactly on at least one band. Items are sorted by each band's value and compared with the next
``window`` items of the same value, which bounds the work when a band value is common
(flat or blank images) at the price of recall within such crowds.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

HASH_SIDE, LOW = 32, 8


@dataclasses.dataclass(kw_only=True)
class PhashConfig:
    max_distance: int = 4  # Hamming bits: at most this far apart = the same picture
    min_side: int = 64  # smaller images carry too little detail: distinct 28 px items collide at distance 0
    window: int = 64  # neighbours compared per item within a band value

    def validate(self) -> None:
        if not 0 <= self.max_distance < 32:
            raise ValueError(f"max_distance must be in [0, 32), got {self.max_distance}")


def _dct_matrix(n: int) -> np.ndarray:
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n)).astype(np.float32)


_DCT = _dct_matrix(HASH_SIDE)[:LOW]  # (8, 32): only the low frequencies are kept


def phash(image: bytes | Image.Image, cfg: PhashConfig) -> tuple[int, int] | None:
    """The 64-bit pHash of an image and of its mirror, or None when the image is below ``min_side``."""
    image = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image
    if min(image.size) < cfg.min_side:
        return None
    grey = np.asarray(image.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.BILINEAR), np.float32)
    return _bits(grey), _bits(grey[:, ::-1])


def _bits(grey: np.ndarray) -> int:
    coefficients = (_DCT @ grey @ _DCT.T).ravel()  # (64,)
    bits = coefficients > np.median(coefficients[1:])  # the DC term would dominate the median
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a ^ b)


def matching_pairs(hashes: np.ndarray, cfg: PhashConfig) -> np.ndarray:
    """(M, 2) index pairs i < j whose hashes are within ``max_distance`` bits, mirrored or not.

    ``hashes`` is (N, 2) uint64: each item's hash and its mirror's."""
    n = len(hashes)
    item = np.tile(np.arange(n), 2)  # both orientations take part in the banding
    flat = np.concatenate([hashes[:, 0], hashes[:, 1]])
    found = [_band_candidates(item, flat, band, cfg.window) for band in _bands(cfg.max_distance)]
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    pairs = np.unique(np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1), axis=0)
    a, b = hashes[pairs[:, 0]], hashes[pairs[:, 1]]
    distance = np.minimum(hamming(a[:, 0], b[:, 0]), hamming(a[:, 0], b[:, 1]))
    return pairs[distance <= cfg.max_distance]


def _bands(max_distance: int) -> list[np.uint64]:
    """Bit masks of max_distance + 1 near-equal bands covering the 64 bits."""
    edges = np.linspace(0, 64, max_distance + 2).astype(int)
    return [np.uint64(((1 << int(hi - lo)) - 1) << int(lo)) for lo, hi in zip(edges[:-1], edges[1:])]


def _band_candidates(item: np.ndarray, flat: np.ndarray, mask: np.uint64, window: int) -> np.ndarray:
    key = flat & mask
    order = np.lexsort((flat, key))  # same band value together, similar hashes side by side
    key, item = key[order], item[order]
    pairs = []
    for offset in range(1, min(window, len(order) - 1) + 1):
        same = np.flatnonzero(key[:-offset] == key[offset:])
        if len(same) == 0:
            break
        pairs.append(np.stack([item[same], item[same + offset]], 1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
