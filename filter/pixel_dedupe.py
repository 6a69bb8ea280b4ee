"""The pixel dedupe level as bucketed tasks over memory-mapped thumbnail parts (see filter/near_dup.py).

Buckets are k-means cells of the translation-invariant descriptor; each image joins the nearest
``probes`` cells of its own descriptor and of its mirror's, so a mirrored copy meets its original.
Within a bucket the search is today's: every image's ``neighbours`` nearest by descriptor (as is
and mirrored, exact kNN), confirmed by the aligned RMS of the thumbnails.
"""

from __future__ import annotations

import numpy as np

from filter.buckets import BucketLevel
from filter.dedupe import LEVELS
from filter.near_dup import descriptor, matching_pairs


@LEVELS.register("pixel")
class Pixel(BucketLevel):
    reason, kind, n_keys = "near_dup", "thumbs", 2

    def settings(self) -> tuple[int, int, int]:
        c = self.ctx.cfg.pixel
        return c.bucket_size, c.probes, c.sample

    def keys(self, x: np.ndarray) -> list[np.ndarray]:
        return [descriptor(x), descriptor(x[:, :, ::-1])]

    def find_pairs(self, x: np.ndarray) -> np.ndarray:
        return matching_pairs(x, x, self.ctx.cfg.pixel, exclude_self=True)
