"""The embedded default dataset: a small real image-caption pool with planted faults.

``pool.parquet`` has one row per URL of the pool. Columns:

- ``id``: row id; ``path``: URL path on the local server (``pipeline.serve``); ``caption``.
- ``http``: how the server answers: ``ok``, ``404``, ``500`` or ``noai`` (``X-Robots-Tag: noai``).
- ground truth: ``fault`` ("" for a clean row, else one of :data:`FAULTS`), ``dup_of`` (the id of
  the row this one duplicates, -1 if none), ``near_dup_kind`` (reencode, resize, shift, flip,
  crop), ``label`` (Fashion-MNIST class, -1 for photos), ``eval_index`` (index into the test
  split for planted evaluation copies), ``source``, ``trusted`` (a clean seed subset, the
  "trusted source" for bootstrapping a scorer DFN-style).
- ``content``: the bytes served (null where the server answers 404/500, and for
  ``duplicate_row`` rows, which repeat an earlier row's URL).

``fashion_mnist/`` holds the Fashion-MNIST test split (10,000 images, MIT licence), the
held-out zero-shot benchmark. Regenerate everything with ``python -m pipeline.embedded.make``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
POOL = HERE / "pool.parquet"
CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FAULTS = [
    "mismatch", "exact_dup", "near_dup", "eval_copy", "http_404", "http_500", "not_image", "truncated",
    "decompression_bomb", "empty_caption", "whitespace_caption", "noai", "duplicate_row", "long_caption",
]


def load_pool(with_content: bool = False) -> pa.Table:
    """The pool with its ground truth (and the served bytes when ``with_content``)."""
    table = pq.read_table(POOL)
    return table if with_content else table.drop_columns(["content"])


def fashion_mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (10000, 28, 28), labels int64 (10000,)) of the Fashion-MNIST test split."""
    folder = HERE / "fashion_mnist"
    images = np.frombuffer(gzip.open(folder / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(folder / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels.astype(np.int64)
