"""Dedupe and decontamination accuracy on the whole embedded pool, scored against its ground truth.

The served bytes are decoded directly (no HTTP): the levels and the eval-copy matcher are the
functions the build runs. The embedding level (EfficientNet-Lite0 over 10k images, about a minute)
is left out here for time; the end-to-end test runs it on a subset, and benchmarks/dedupe.py on
the whole pool.
"""

import hashlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from filter.dedupe import Features, roots
from filter.near_dup import matching_pairs, thumbnail
from filter.phash import phash
from pipeline.core import config
from pipeline.build_shards import BuildConfig
from pipeline.embedded import fashion_mnist_test, load_pool

DEFAULTS = config.load(BuildConfig, config.CONFIG_ROOT / "data" / "default.yaml")  # the thresholds the build uses


@pytest.fixture(scope="module")
def pool():
    """Every pool row that serves image bytes, with its group: the row it copies, or itself."""
    torch.set_num_threads(2)
    table = load_pool(with_content=True).to_pandas()
    table = table[table.content.notna() & (table.http == "ok") & table.fault.isin(["", "mismatch", "exact_dup", "near_dup", "eval_copy"])]
    table = table.sort_values("id").reset_index(drop=True)
    table["group"] = np.where(table.dup_of >= 0, table.dup_of, table.id)
    return table


def score_groups(group: np.ndarray, removed: dict[int, int]) -> tuple[float, list]:
    """Recall per copy group (a group of g copies owes g - 1 removals) and the wrong removals:
    an item removed as a copy of an item outside its planted group."""
    owed = {g: c - 1 for g, c in Counter(group).items() if c > 1}
    paid = Counter(group[i] for i, kept in removed.items() if group[i] == group[kept])
    recall = sum(min(paid[g], n) for g, n in owed.items()) / sum(owed.values())
    return recall, [(i, kept) for i, kept in removed.items() if group[i] != group[kept]]


def test_planted_duplicates_removed_and_no_distinct_image(pool):
    cfg = DEFAULTS.dedupe
    hashes = [phash(b, cfg.phash) for b in pool.content]
    features = Features(
        rows=pool.id.to_numpy(), uid=pool.id.astype(str).to_numpy(),
        sha256=np.array([hashlib.sha256(b).hexdigest() for b in pool.content]),
        caption=pool.caption.to_numpy(), phash=np.array([h or (0, 0) for h in hashes], np.uint64),
        has_phash=np.array([h is not None for h in hashes]), thumbs=np.stack([thumbnail(b, cfg.pixel) for b in pool.content]), embeddings=None,
    )
    alive, removed = np.arange(len(pool)), {}
    for level in ("exact", "phash", "pixel"):
        root = roots(level, features.take(alive), cfg)  # the build's map, reduce and merge, in memory
        dropped = root != np.arange(len(alive))
        removed.update(zip(alive[dropped].tolist(), alive[root[dropped]].tolist()))
        alive = alive[~dropped]
    recall, wrong = score_groups(pool.group.to_numpy(), removed)
    print(f"dedupe: recall {recall:.3f} over {(pool.dup_of >= 0).sum()} planted copies, {len(wrong)} distinct images removed")
    # README: 0.958 (161 of 168); the 7 misses are the photos' 85% crops, left to the embedding level.
    assert recall >= 161 / 168
    assert wrong == [], [(pool.id[i], pool.fault[i], pool.id[k], pool.fault[k]) for i, k in wrong]
    kept_first = [pool.id[k] <= pool.id[i] for i, k in removed.items()]
    assert all(kept_first)  # the first input row of a group survives


def test_decontamination_removes_eval_copies_and_no_clean_row(pool):
    cfg = DEFAULTS.decontaminate.pixel
    images, _ = fashion_mnist_test()
    eval_thumbs = np.stack([thumbnail(Image.fromarray(a), cfg) for a in images])
    thumbs = np.stack([thumbnail(b, cfg) for b in pool.content])
    flagged = np.zeros(len(pool), bool)
    flagged[matching_pairs(thumbs, eval_thumbs, cfg, exclude_self=False)[:, 0]] = True
    planted = (pool.fault == "eval_copy").to_numpy()
    recall = (flagged & planted).sum() / planted.sum()
    print(f"decontaminate: recall {recall:.3f} over {planted.sum()} eval copies, {(flagged & ~planted).sum()} clean rows removed")
    assert recall == 1.0  # README: 1.000 over 40 eval copies
    assert not (flagged & ~planted).any(), pool[flagged & ~planted][["id", "fault", "source"]]
