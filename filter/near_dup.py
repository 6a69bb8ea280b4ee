"""Pixel-level near-duplicate matching, shared by dedupe and decontamination.

pHash does not separate small images: on the embedded pool's 28x28 Fashion-MNIST items, distinct
images collide at Hamming distance 0 while one-pixel shifts of the same image land at 6 to 22.
So candidates come from a translation-invariant descriptor (the magnitude of the low 2-D Fourier
frequencies of a grey thumbnail, queried as is and mirrored) through a faiss kNN search, and each
candidate pair is confirmed by the RMS difference of the two blurred thumbnails at their best
alignment (small shifts, mirrored or not).
"""

from __future__ import annotations

import dataclasses
import io
from typing import TYPE_CHECKING

import faiss
import numpy as np
from PIL import Image, ImageFilter

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(kw_only=True)
class PixelMatchConfig:
    size: int = 32  # thumbnail side
    blur: float = 1.0  # Gaussian radius (pixels of the thumbnail) before comparing: absorbs JPEG and resampling noise
    neighbours: int = 8  # kNN candidates per image and orientation
    max_shift: int = 1  # alignment search, thumbnail pixels
    max_rms: float = 8.0  # grey levels (0-255): at most this different after alignment = the same picture


@dataclasses.dataclass(kw_only=True)
class PixelDedupeConfig(PixelMatchConfig):
    # Dedupe seeks pairs within buckets (an IVF index cut into tasks, filter/pixel_dedupe.py): rows / bucket_size
    # k-means cells of the descriptors; each image joins the nearest `probes` of its own and of its mirror's.
    bucket_size: int = 20000  # the kNN inside a bucket is exact: a row's cost grows with this, recall too
    probes: int = 2  # buckets an image joins per orientation (its descriptor's nearest cells): 1 lost 10% of copies at 50k rows
    sample: int = 262144  # k-means training rows (a fixed seeded sample: every row when there are fewer); at most sample / 64 centroids


def thumbnail(image: bytes | Image.Image, cfg: PixelMatchConfig) -> np.ndarray:
    """(size, size) uint8 grey thumbnail of encoded bytes or an image, blurred."""
    image = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image
    image = image.convert("L").resize((cfg.size, cfg.size), Image.BILINEAR)
    if cfg.blur:
        image = image.filter(ImageFilter.GaussianBlur(cfg.blur))
    return np.asarray(image, np.uint8)


def descriptor(thumbs: np.ndarray, chunk_rows: int = 4096) -> np.ndarray:
    """(N, 64) float32 unit-norm square-root magnitudes of the 8x8 lowest frequencies: blind to translation.
    Square roots, not logs: a log blows up the noise of the weak coefficients, and a one-pixel shift (not
    circular: an edge column repeats) lost copies. On synthetic thumbnails, 1.8% of shifted copies fell out of
    their original's 8 nearest among 80,000, and 8.9% out of its 2 nearest of 200 k-means cells (square roots: 0, 0.5%).
    In chunks: the FFT's complex128 scratch is ``chunk_rows`` images, not all of them."""
    out = np.empty((len(thumbs), 64), np.float32)
    for start in range(0, len(thumbs), chunk_rows):
        x = np.asarray(thumbs[start : start + chunk_rows], np.float32)
        spectrum = np.abs(np.fft.fft2(x - x.mean((1, 2), keepdims=True)))[:, :8, :8]
        d = np.sqrt(spectrum).reshape(len(x), -1).astype(np.float32)
        out[start : start + len(x)] = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
    return out


def candidates(queries: np.ndarray, base: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    """(M, 2) unique (query, base) index pairs: each query's k nearest base thumbnails, as is or mirrored."""
    if len(base) == 0 or len(queries) == 0:
        return np.zeros((0, 2), np.int64)
    index = faiss.IndexFlatIP(64)
    index.add(descriptor(base))
    k = min(k + int(exclude_self), len(base))
    found = [index.search(descriptor(q), k)[1] for q in (queries, queries[:, :, ::-1])]
    q = np.repeat(np.arange(len(queries)), 2 * k)
    b = np.concatenate(found, axis=1).ravel()
    keep = (b >= 0) & ((q != b) if exclude_self else True)
    pairs = np.stack([q[keep], b[keep]], 1)
    if exclude_self:  # (a, b) and (b, a) are the same pair
        pairs = np.sort(pairs, axis=1)
    return np.unique(pairs, axis=0)


def aligned_rms(a: np.ndarray, b: np.ndarray, max_shift: int) -> np.ndarray:
    """(N,) RMS grey-level difference of thumbnail pairs at their best shift and mirroring.

    Each image's central window is matched against the other's shifted windows, both ways round:
    the border a shift pushes out of one image (and the blur smears) lies in only one window."""
    import torch  # here, not at module level: a task that never compares pixels starts without it

    a, b = torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32))
    return _window_rms(a, b, max_shift).minimum(_window_rms(b, a, max_shift)).numpy()


def _window_rms(a: torch.Tensor, b: torch.Tensor, s: int) -> torch.Tensor:
    n = a.shape[-1]
    a = a[:, s : n - s, s : n - s]  # (N, n-2s, n-2s)
    best = a.new_full((len(a),), float("inf"))
    for bb in (b, b.flip(-1)):
        for dy in range(-s, s + 1):
            for dx in range(-s, s + 1):
                shifted = bb[:, s + dy : n - s + dy, s + dx : n - s + dx]
                best = best.minimum((a - shifted).pow(2).mean((1, 2)).sqrt())
    return best


def matching_pairs(queries: np.ndarray, base: np.ndarray, cfg: PixelMatchConfig, exclude_self: bool) -> np.ndarray:
    """(M, 2) (query, base) pairs that show the same picture."""
    pairs = candidates(queries, base, cfg.neighbours, exclude_self)
    same = np.zeros(len(pairs), bool)
    for start in range(0, len(pairs), 512):  # 512 pairs keep each shift's temporaries in cache: 65536 ran 9x slower
        chunk = pairs[start : start + 512]
        same[start : start + len(chunk)] = aligned_rms(queries[chunk[:, 0]], base[chunk[:, 1]], cfg.max_shift) <= cfg.max_rms
    return pairs[same]


def groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of ``pairs`` over n items: (n,) the smallest index of each item's group."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(n)])
