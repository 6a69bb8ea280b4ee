"""The URL list front door: schema errors stop before any work; bad rows are counted, not fatal."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filter.clip_score import ClipScore, ClipScoreConfig
from pipeline.core.tasks import task_range
from pipeline.download import error_reason
from pipeline.core.shards import Layout
from pipeline.sources import InputConfig, InputError, prepare


def test_missing_caption_column_stops_before_any_work(tmp_path):
    pq.write_table(pa.table({"url": ["http://a/x.jpg"], "text": ["a"]}), tmp_path / "urls.parquet")
    with pytest.raises(InputError, match="missing column"):
        prepare(str(tmp_path / "urls.parquet"), InputConfig(), Layout(str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_unreadable_input_is_a_clear_error(tmp_path):
    (tmp_path / "urls.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read"):
        prepare(str(tmp_path / "urls.parquet"), InputConfig(), Layout(str(tmp_path / "out")))
    with pytest.raises(InputError, match="does not exist"):
        prepare(str(tmp_path / "nothing.csv"), InputConfig(), Layout(str(tmp_path / "out")))


def test_csv_bad_utf8_and_non_http_urls_are_counted_skips(tmp_path):
    (tmp_path / "urls.csv").write_bytes(
        b"url,caption\nhttp://h/1.jpg,fine\nhttp://h/2.jpg,bad \xff\xfe bytes\nfile:///etc/passwd,secret\nhttps://h/3.jpg,\n"
    )
    layout = Layout(str(tmp_path / "out"))
    index = prepare(str(tmp_path / "urls.csv"), InputConfig(part_size=3), layout)
    assert index["rows"] == 4 and index["parts"] == 2
    assert index["rejected"] == {"invalid_utf8": 1, "unsupported_url_scheme": 1}
    part = pq.read_table(layout.input_part(0)).to_pylist()
    assert [r["fetch_url"] for r in part] == ["http://h/1.jpg", "", ""]  # img2dataset never sees file://
    assert all(len(r["uid"]) == 32 for r in part)


def test_error_messages_map_to_reasons():
    assert error_reason("HTTP Error 404: Not Found") == "http_404"
    assert error_reason("<urlopen error [Errno 111] Connection refused>") == "connection_refused"
    assert error_reason("The read operation timed out") == "timeout"
    assert error_reason("Use of image disallowed by X-Robots-Tag directive") == "noai"
    assert error_reason("something new") == "download_error"


def test_task_ranges_are_disjoint_and_cover_everything():
    slices = [task_range(f"{i}/3", 10) for i in range(3)]
    assert sorted(p for s in slices for p in s) == list(range(10))


def test_top_fraction_is_computed_over_the_whole_dataset():
    # Shard 0 holds only low scores: a per-shard top fraction would keep some of them.
    scores = np.r_[np.linspace(0.0, 0.1, 50), np.linspace(0.5, 0.6, 50)].astype(np.float32)
    table = pa.table({"row": np.arange(100), "clip_score": scores, "part": np.repeat([0, 1], 50)})
    reasons = ClipScore(ClipScoreConfig(fraction=0.3), None).dataset(table)
    kept = [i for i, r in enumerate(reasons) if not r]
    assert len(kept) == 30 and min(kept) >= 50 and kept == list(range(70, 100))
