"""The embedded dataset: its recorded ground truth matches what is really in it, and the
local server answers every row the way the ground truth says."""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from pipeline.embedded import CLASSNAMES, FAULTS, HERE, fashion_mnist_test, load_pool
from pipeline.embedded.make import SYNONYMS
from pipeline.serve import serve_pool


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_pool(with_content=True).to_pylist()


@pytest.fixture(scope="module")
def by_id(rows) -> dict[int, dict]:
    return {r["id"]: r for r in rows}


def decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("L"), dtype=np.float32)


def caption_classes(caption: str) -> set[int]:
    """Classes named in a caption; the longest name wins ("t-shirt" is not a "shirt")."""
    text, found = f" {caption.lower()} ", set()
    for name, label in sorted(((n, c) for c, names in enumerate(SYNONYMS) for n in names), key=lambda x: -len(x[0])):
        match = re.search(rf"(?<![\w-]){re.escape(name)}(?!\w)", text)
        if match:
            found.add(label)
            text = text[: match.start()] + " " * len(name) + text[match.end() :]
    return found


def test_summary_matches_rows(rows):
    summary = json.loads((HERE / "ground_truth.json").read_text())
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["fault"] or "clean"] = counts.get(r["fault"] or "clean", 0) + 1
    assert summary["faults"] == counts and summary["rows"] == len(rows)
    assert set(counts) - {"clean"} == set(FAULTS), "every fault class is planted"
    assert 0.08 <= counts["mismatch"] / len(rows) <= 0.12
    assert len({r["id"] for r in rows}) == len(rows)


def test_clean_captions_name_their_class_and_mismatches_do_not(rows):
    for r in rows:
        if r["fault"] == "" and r["label"] >= 0:
            assert r["label"] in caption_classes(r["caption"]), r
        if r["fault"] == "mismatch":
            assert r["label"] not in caption_classes(r["caption"]), r
            assert decode(r["content"]).shape == (28, 28)


def test_duplicates_point_at_their_originals(rows, by_id):
    for r in rows:
        if r["fault"] == "exact_dup":
            assert r["content"] == by_id[r["dup_of"]]["content"] and r["path"] != by_id[r["dup_of"]]["path"]
        elif r["fault"] == "near_dup":
            original = by_id[r["dup_of"]]
            assert r["content"] != original["content"] and original["fault"] == ""
            a, b = decode(r["content"]), decode(original["content"])
            if r["near_dup_kind"] == "flip":
                a = a[:, ::-1]
            if a.shape == b.shape and r["near_dup_kind"] != "shift":
                assert np.abs(a - b).mean() < 12, r["near_dup_kind"]
        elif r["fault"] == "duplicate_row":
            original = by_id[r["dup_of"]]
            assert (r["path"], r["caption"]) == (original["path"], original["caption"]) and r["content"] is None
        else:
            assert r["dup_of"] == -1
    position = {r["id"]: k for k, r in enumerate(rows)}
    assert all(position[r["dup_of"]] < position[r["id"]] for r in rows if r["dup_of"] >= 0), "copies follow originals"


def test_eval_copies_are_test_images():
    images, labels = fashion_mnist_test()
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    assert len(CLASSNAMES) == 10
    for r in load_pool(with_content=True).to_pylist():
        if r["fault"] == "eval_copy":
            copy = decode(r["content"])
            assert r["label"] == labels[r["eval_index"]]
            if r["near_dup_kind"] == "flip":
                copy = copy[:, ::-1]
            if copy.shape == (28, 28) and r["near_dup_kind"] != "shift":
                assert np.abs(copy - images[r["eval_index"]]).mean() < 12


def test_broken_payloads_are_really_broken(rows):
    for r in rows:
        if r["fault"] in ("not_image", "truncated"):
            with pytest.raises(OSError):
                Image.open(io.BytesIO(r["content"])).load()
        elif r["fault"] == "decompression_bomb":
            assert len(r["content"]) < 300_000
            with pytest.raises(Image.DecompressionBombError):
                Image.open(io.BytesIO(r["content"]))
        elif r["fault"] in ("empty_caption", "whitespace_caption"):
            assert r["caption"].strip() == ""
        elif r["fault"] == "long_caption":
            assert len(r["caption"]) > 2000


def test_trusted_rows_are_clean(rows):
    trusted = [r for r in rows if r["trusted"]]
    assert len(trusted) >= 1000 and all(r["fault"] == "" for r in trusted)


def test_server_answers_as_ground_truth_says(rows, tmp_path):
    wanted = {}
    for r in rows:  # one row of each kind of answer
        wanted.setdefault((r["http"], r["fault"]), r)
    with serve_pool(max_seconds=60) as server:
        urls = server.write_url_list(tmp_path / "urls.parquet")
        for r in wanted.values():
            url = f"{server.base_url}/{r['path']}"
            if r["http"] in ("404", "500"):
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(url, timeout=10)
                assert err.value.code == int(r["http"])
                continue
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.read() == (r["content"] or next(x["content"] for x in rows if x["path"] == r["path"] and x["content"]))
                assert (response.headers.get("X-Robots-Tag") == "noai") == (r["http"] == "noai")
    import pyarrow.parquet as pq

    table = pq.read_table(urls)
    assert table.num_rows == len(rows) and {"url", "caption", "id", "trusted"} <= set(table.column_names)
    assert all(u.startswith("http://127.0.0.1:") for u in table.column("url").to_pylist())


def test_generation_is_deterministic(tmp_path):
    """Regenerating from the real sources gives byte-identical files (skipped without them)."""
    import hashlib
    import subprocess
    import sys

    source = HERE.parents[2] / "shared" / "data"
    if not (source / "fashion-mnist").is_dir():
        pytest.skip("the source images (../shared/data) are not beside this checkout")
    subprocess.run([sys.executable, "-m", "pipeline.embedded.make", "--source", str(source), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("pool.parquet", "ground_truth.json"):
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == hashlib.sha256((HERE / name).read_bytes()).hexdigest(), name
