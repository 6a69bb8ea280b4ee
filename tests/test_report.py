"""Curation quality against planted ground truth, on hand-built cases with known answers."""

import pandas as pd
import pytest

from pipeline.demo_report import curation_quality

# id, fault, dup_of: two clean originals (1, 2), copies of 1 (3 exact, 4 near), a copy of 2 (5),
# mismatched captions (6, 7), an evaluation copy (8), a 404 (9), clean singletons (10, 11).
POOL = pd.DataFrame({
    "id": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    "fault": ["", "", "exact_dup", "near_dup", "near_dup", "mismatch", "mismatch", "eval_copy", "http_404", "", ""],
    "dup_of": [-1, -1, 1, 1, 2, -1, -1, -1, -1, -1, -1],
})


def manifest(dropped: dict[int, tuple[str, str]]) -> pd.DataFrame:
    steps = [dropped.get(i, ("", ""))[0] for i in POOL["id"]]
    reasons = [dropped.get(i, ("", ""))[1] for i in POOL["id"]]
    return pd.DataFrame({"id": POOL["id"], "step": steps, "reason": reasons})


def test_perfect_curation():
    q = curation_quality(manifest({
        3: ("dedupe", "exact"), 4: ("dedupe", "phash"), 5: ("dedupe", "embedding"), 6: ("clip_score", "low_score"),
        7: ("clip_score", "low_score"), 8: ("dedupe", "eval_contamination"), 9: ("download", "http_404"),
    }), POOL)
    assert q["mismatch"] == {"recall": 1.0, "precision": 1.0, "removed": 2, "planted": 2}
    assert q["duplicates"]["recall"] == 1.0 and q["duplicates"]["distinct_images_dropped"] == 0
    assert q["per_fault"]["eval_copy"]["recall"] == 1.0
    assert q["per_fault"]["http_404"]["reasons"] == {"http_404": 1}
    assert q["per_fault"]["clean"]["removed"] == 0


def test_keeping_a_copy_instead_of_the_original_is_not_a_loss():
    q = curation_quality(manifest({1: ("dedupe", "exact"), 3: ("dedupe", "exact"), 5: ("dedupe", "phash")}), POOL)
    assert q["duplicates"]["recall"] == 1.0  # group {1, 3, 4} kept 4; group {2, 5} kept 2
    assert q["duplicates"]["distinct_images_dropped"] == 0


def test_errors_are_counted():
    q = curation_quality(manifest({
        3: ("dedupe", "exact"),  # group {1, 3, 4} keeps 1 and 4: one copy missed
        2: ("dedupe", "phash"), 5: ("dedupe", "phash"),  # group {2, 5} lost entirely
        10: ("dedupe", "caption"),  # a distinct image dropped
        6: ("clip_score", "low_score"), 11: ("clip_score", "low_score"),  # one hit, one false removal
    }), POOL)
    assert q["duplicates"]["recall"] == pytest.approx(2 / 3)
    assert q["duplicates"]["distinct_images_dropped"] == 2
    assert q["mismatch"]["recall"] == 0.5 and q["mismatch"]["precision"] == 0.5


def test_a_copy_whose_original_fell_earlier_is_distinct():
    q = curation_quality(manifest({2: ("basic", "min_side")}), POOL)  # 5 is now the only copy of its image
    assert q["duplicates"]["planted"] == 2 and q["duplicates"]["distinct_images_dropped"] == 0
