"""Perceptual hashing with multi-index candidate search: near-duplicate photos among millions.

A 64-bit pHash is the sign pattern of the 8x8 lowest DCT frequencies of a 32x32 grey image
against their median. Copies that were re-encoded or resized keep nearly every bit; mirrored
copies match the hash of the mirrored image, which is kept beside it.

Comparing every pair is quadratic, so candidates come from keys (the generalised pigeonhole of
multi-index hashing): the 64 bits are cut into ``blocks`` near-equal blocks, and two hashes
within ``max_distance`` bits differ in at most ``max_distance`` blocks, so they agree exactly on
some ``blocks - max_distance`` of them. Each such choice of blocks is a key: C(blocks,
max_distance) keys of ~64 (blocks - max_distance) / blocks bits. Records sharing a key value are
sorted by hash and each is compared with its next ``window``, which bounds the work when a value
is common (flat or blank images) at the price of recall within such crowds. Random hashes share
a value ~2n / 2^bits times: the classic banding (``blocks = max_distance + 1``, ~13-bit bands)
outgrows a 64 window near 1M rows; 6 blocks at ``max_distance`` 4 (15 keys of ~21 bits) hold to a
few hundred million rows, 7 (35 keys of ~27 bits) past that.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math

import numpy as np
from PIL import Image

HASH_SIDE, LOW = 32, 8
CHUNK = 1 << 16  # candidate pairs compared at once


@dataclasses.dataclass(kw_only=True)
class PhashConfig:
    max_distance: int = 4  # Hamming bits: at most this far apart = the same picture
    min_side: int = 64  # smaller images carry too little detail: distinct 28 px items collide at distance 0
    blocks: int = 6  # of the 64 bits; a key is any blocks - max_distance of them: 6 -> 15 keys of ~21 bits (to a few 100M rows), 7 -> 35 of ~27 (beyond)
    window: int = 64  # neighbours compared per record within a key value: bounds the work in crowds (blank images)

    def validate(self) -> None:
        if not 0 <= self.max_distance < 32:
            raise ValueError(f"max_distance must be in [0, 32), got {self.max_distance}")
        if not self.max_distance < self.blocks <= 64:
            raise ValueError(f"blocks must be in (max_distance, 64], got {self.blocks} with max_distance {self.max_distance}")
        if math.comb(self.blocks, self.max_distance) > 255:  # each key is 2 records per row
            raise ValueError(f"C(blocks, max_distance) = {math.comb(self.blocks, self.max_distance)} keys: at most 255")


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
    item, orient, key, _ = candidate_keys(hashes, cfg)
    return close_pairs(item, orient, key, hashes[item, 0], hashes[item, 1], cfg)


def key_masks(cfg: PhashConfig) -> np.ndarray:
    """(C(blocks, max_distance),) uint64: the bits of each candidate key, one per choice of
    ``blocks - max_distance`` of the near-equal blocks covering the 64 bits."""
    edges = np.linspace(0, 64, cfg.blocks + 1).astype(int)
    block = [((1 << int(hi - lo)) - 1) << int(lo) for lo, hi in zip(edges[:-1], edges[1:])]
    kept = itertools.combinations(range(cfg.blocks), cfg.blocks - cfg.max_distance)
    return np.array([sum(block[b] for b in combination) for combination in kept], np.uint64)


def key_values(flat: np.ndarray, key: np.ndarray, cfg: PhashConfig) -> np.ndarray:
    """The value of candidate key ``key`` (index into :func:`key_masks`) of each oriented hash ``flat``."""
    return flat & key_masks(cfg)[key]


def candidate_keys(hashes: np.ndarray, cfg: PhashConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (item, orientation, key) of (N, 2) hashes: item index, orient (int8), key index (uint8), key value (uint64).

    Both orientations take part, so a copy mirrored against the other meets it on some key."""
    n, keys = len(hashes), len(key_masks(cfg))
    item = np.tile(np.arange(n), 2 * keys)
    orient = np.tile(np.repeat(np.arange(2, dtype=np.int8), n), keys)
    key = np.repeat(np.arange(keys, dtype=np.uint8), 2 * n)
    return item, orient, key, key_values(np.tile(np.concatenate([hashes[:, 0], hashes[:, 1]]), keys), key, cfg)


def close_pairs(item: np.ndarray, orient: np.ndarray, key: np.ndarray, h0: np.ndarray, h1: np.ndarray, cfg: PhashConfig) -> np.ndarray:
    """Unique (smaller item, larger item) pairs within ``max_distance`` among records (item, orient, key, h0, h1)
    that share a key value, each compared with its next ``window`` records in order of the oriented hash.

    Ties keep (orient, item) order, so the result does not depend on how the records were split or shuffled."""
    flat = np.where(orient == 1, h1, h0)  # orient 0: the image's hash, 1: its mirror's
    value = key_values(flat, key, cfg)
    order = np.lexsort((item, orient, flat, value, key))
    item, key, value, h0, h1 = item[order], key[order], value[order], h0[order], h1[order]
    found = []
    for offset in range(1, min(cfg.window, len(order) - 1) + 1):
        same = np.flatnonzero((key[:-offset] == key[offset:]) & (value[:-offset] == value[offset:]))
        if len(same) == 0:
            break
        for start in range(0, len(same), CHUNK):  # tested in chunks: the temporaries do not grow with the collisions
            i = same[start : start + CHUNK]
            j = i + offset
            swap = item[i] > item[j]
            a, b = np.where(swap, j, i), np.where(swap, i, j)  # measured from the earlier item's hash
            distance = np.minimum(hamming(h0[a], h0[b]), hamming(h0[a], h1[b]))
            keep = (item[a] != item[b]) & (distance <= cfg.max_distance)
            found.append(np.stack([item[a][keep], item[b][keep]], 1))
    return np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)
