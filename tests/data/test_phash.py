"""pHash and its multi-index candidate search (filter/phash.py), on the embedded pool's photos and random hashes."""

import io

import numpy as np
import pytest
from PIL import Image

from filter.phash import PhashConfig, hamming, matching_pairs, phash
from pipeline.embedded import load_pool

CFG = PhashConfig()


@pytest.fixture(scope="module")
def photos():
    table = load_pool(with_content=True).to_pandas()
    return table[(table.source == "photo") & (table.http == "ok")].sort_values("id").reset_index(drop=True)


def test_copies_hash_alike_and_distinct_photos_do_not(photos):
    hashes = np.array([phash(b, CFG) for b in photos.content], np.uint64)
    by_id = dict(zip(photos.id, hashes))
    for row in photos[photos.dup_of >= 0].itertuples():
        original, copy = by_id[row.dup_of], by_id[row.id]
        mirrored = min(hamming(original[0], copy[0]), hamming(original[0], copy[1]))
        if row.near_dup_kind in ("reencode", "resize", "flip"):
            assert mirrored <= 2, row
        else:  # a crop moves every frequency: left to the embedding level
            assert mirrored > CFG.max_distance, row
    originals = hashes[(photos.dup_of < 0).to_numpy()]
    distances = [hamming(a[0], b[0]) for i, a in enumerate(originals) for b in originals[i + 1 :]]
    assert min(distances) > 4 * CFG.max_distance


def test_small_images_are_not_hashed():
    assert phash(Image.new("L", (28, 28)), CFG) is None
    assert phash(Image.new("L", (64, 80)), CFG) is not None


def brute_force(hashes: np.ndarray, max_distance: int) -> set:
    a, b = np.triu_indices(len(hashes), 1)
    d = np.minimum(hamming(hashes[a, 0], hashes[b, 0]), hamming(hashes[a, 0], hashes[b, 1]))
    return set(zip(a[d <= max_distance].tolist(), b[d <= max_distance].tolist()))


@pytest.mark.parametrize("max_distance,blocks", [(0, 6), (4, 5), (4, 6), (8, 10)])
def test_keyed_search_finds_every_pair_brute_force_finds(max_distance, blocks):
    rng = np.random.default_rng(max_distance)
    hashes = rng.integers(0, 2**63, (3000, 2), dtype=np.uint64)
    copies = rng.choice(3000, 300, replace=False)
    flips = rng.integers(0, 64, (300, max_distance)) if max_distance else np.zeros((300, 0), int)
    noise = np.array([sum(1 << int(bit) for bit in set(row)) for row in flips], np.uint64)
    hashes[copies[150:], 0] = hashes[copies[:150], 0] ^ noise[:150]  # near copies
    hashes[copies[:150], 1] = hashes[copies[150:], 1]  # mirrored pairs: the mirror hashes agree
    hashes[copies[150:], 1] = hashes[copies[:150], 0] ^ noise[150:]  # ... and a mirror near the other's hash
    cfg = PhashConfig(max_distance=max_distance, blocks=blocks, window=3000)
    found = set(map(tuple, matching_pairs(hashes, cfg).tolist()))
    expected = brute_force(hashes, max_distance)
    assert len(expected) >= 150 and found == expected


def test_window_bounds_the_work_on_a_crowd_of_equal_hashes():
    hashes = np.zeros((5000, 2), np.uint64)  # blank images: one hash
    pairs = matching_pairs(hashes, PhashConfig(window=8))
    assert len(pairs) <= 5000 * 8 * 2
    # every item is linked to its neighbours in the crowd, so the crowd is one group
    assert len(np.unique(pairs)) == 5000


def planted_copies(n: int, copies: int, seed: int = 0) -> tuple[np.ndarray, set]:
    """n random hash pairs; the last ``copies`` items are copies of the first, 1-4 bits flipped, some mirrored."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, (n, 2), dtype=np.uint64)
    original, copy = np.arange(copies), n - copies + np.arange(copies)
    flips = np.array([sum(1 << int(b) for b in rng.choice(64, k, replace=False)) for k in rng.integers(1, 5, copies)], np.uint64)
    mirrored = rng.random(copies) < 0.3
    hashes[copy, 0] = np.where(mirrored, hashes[original, 1], hashes[original, 0]) ^ flips
    hashes[copy, 1] = np.where(mirrored, hashes[original, 0], hashes[original, 1]) ^ flips
    return hashes, set(zip(original.tolist(), copy.tolist()))


def test_keys_keep_recall_where_band_values_outgrow_the_window():
    # 80k oriented hashes share each 13-bit band value ~10 times, beyond a window of 4; a 21-bit key value ~0.04 times
    hashes, expected = planted_copies(40_000, 2000)
    found = set(map(tuple, matching_pairs(hashes, PhashConfig(blocks=6, window=4)).tolist()))
    assert found == expected  # random 64-bit pairs within 4 bits: ~1e-5 expected among these 8e8
    banded = set(map(tuple, matching_pairs(hashes, PhashConfig(blocks=CFG.max_distance + 1, window=4)).tolist()))
    assert banded < expected and len(expected - banded) > 10


def test_blocks_must_leave_a_key_to_agree_on():
    for blocks in (CFG.max_distance, 65):
        with pytest.raises(ValueError, match="blocks"):
            PhashConfig(blocks=blocks).validate()
    PhashConfig(blocks=CFG.max_distance + 1).validate()
