"""The URL list front door: schema errors stop before any work; bad rows are counted, not fatal."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filter import StepContext
from filter.clip_score import ClipScore, ClipScoreConfig
from pipeline.core.io import write_json, write_parquet
from pipeline.core.tasks import task_range
from pipeline.download import error_reason
from pipeline.core.shards import Layout
from pipeline.sources import InputConfig, InputError, derive_uid, prepare


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


def test_top_fraction_is_computed_over_the_whole_dataset(tmp_path):
    # Part 0 holds only low scores: a per-part top fraction would keep some of them. Ties at the
    # cut (rows 68-71 score alike) are kept in input order, as one sort of the whole pool would.
    scores = np.r_[np.linspace(0.0, 0.1, 50), np.linspace(0.5, 0.6, 50)].astype(np.float32)
    scores[68:72] = scores[70]
    layout = Layout(str(tmp_path))
    write_json(layout.input_index, {"parts": 2, "part_size": 50})
    for part in (0, 1):
        rows = np.arange(50 * part, 50 * part + 50)[::-1]  # a part's table need not be in row order
        write_parquet(layout.step("clip_score", part), pa.table({"row": rows, "clip_score": scores[rows]}))
    step = ClipScore(ClipScoreConfig(fraction=0.3), StepContext(layout, "clip_score"))
    for phase in step.phases():
        for task in range(phase.tasks):
            phase.run(task)
    dropped = np.concatenate([pq.read_table(layout.decisions("clip_score", p))["row"].to_numpy() for p in (0, 1)])
    assert sorted(set(range(100)) - set(dropped.tolist())) == [68, 69, *range(72, 100)]


# ---------------------------------------------------------------------------- hostile rows and files


def prepared(tmp_path, name: str, data: bytes, cfg: InputConfig | None = None) -> list[dict]:
    (tmp_path / name).write_bytes(data)
    layout = Layout(str(tmp_path / "out"))
    prepare(str(tmp_path / name), cfg or InputConfig(), layout)
    return pq.read_table(layout.input_part(0)).to_pylist()


def test_a_uid_with_a_trailing_newline_is_invalid(tmp_path):
    uid = "0123456789abcdef0123456789abcdef"
    table = pa.table({"url": ["http://h/1.jpg", "http://h/2.jpg"], "caption": ["a", "b"], "key": [uid, uid.replace("0", "1") + "\n"]})
    pq.write_table(table, tmp_path / "urls.parquet")
    layout = Layout(str(tmp_path / "out"))
    prepare(str(tmp_path / "urls.parquet"), InputConfig(uid_col="key"), layout)
    assert [r["reject"] for r in pq.read_table(layout.input_part(0)).to_pylist()] == ["", "invalid_uid"]


def test_duplicate_given_uids_are_counted_not_merged(tmp_path):
    uid = "0123456789abcdef0123456789abcdef"
    data = f"url,caption,key\nhttp://h/1.jpg,first,{uid}\nhttp://h/2.jpg,second,{uid.upper()}\n".encode()
    rows = prepared(tmp_path, "urls.csv", data, InputConfig(uid_col="key"))
    assert [(r["caption"], r["reject"]) for r in rows] == [("first", ""), ("second", "duplicate_uid")]


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    rows = prepared(tmp_path, "urls.csv", b"\xef\xbb\xbfurl,caption\nhttp://h/1.jpg,a shirt\n")
    assert [(r["url"], r["caption"], r["reject"]) for r in rows] == [("http://h/1.jpg", "a shirt", "")]


def test_missing_captions_are_empty_not_nan(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"url": ["http://h/1.jpg", "http://h/2.jpg", "http://h/3.jpg"],
                          "caption": pd.array(["a shirt", pd.NA, None], dtype="string")})
    frame.to_parquet(tmp_path / "na.parquet")
    pq.write_table(pa.table({"url": ["http://h/4.jpg", "http://h/5.jpg"], "caption": [float("nan"), 2.5]}), tmp_path / "nan.parquet")
    layout = Layout(str(tmp_path / "out"))
    prepare(str(tmp_path), InputConfig(), layout)
    assert [r["caption"] for r in pq.read_table(layout.input_part(0)).to_pylist()] == ["a shirt", "", "", "", "2.5"]


def test_spaces_and_non_ascii_are_percent_encoded_for_the_fetch_only(tmp_path):
    urls = ["http://h/a b.jpg", "http://h/ünï/çödé.jpg?q=ä b&x=1", "http://h/already%20done.jpg", "http://h/plain.jpg"]
    data = "".join(json.dumps({"url": u, "caption": "a"}) + "\n" for u in urls).encode()
    rows = prepared(tmp_path, "urls.jsonl", data)
    assert [r["url"] for r in rows] == urls
    assert [r["fetch_url"] for r in rows] == [
        "http://h/a%20b.jpg", "http://h/%C3%BCn%C3%AF/%C3%A7%C3%B6d%C3%A9.jpg?q=%C3%A4%20b&x=1",
        "http://h/already%20done.jpg", "http://h/plain.jpg"]


def test_empty_files_add_no_rows_and_an_empty_list_is_one_clear_line(tmp_path):
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "a.csv").write_bytes(b"url,caption\nhttp://h/1.jpg,a shirt\n")
    (tmp_path / "list" / "b.csv").write_bytes(b"")
    index = prepare(str(tmp_path / "list"), InputConfig(), Layout(str(tmp_path / "out")))
    assert index["rows"] == 1 and [n.rsplit("/", 1)[-1] for n in index["empty_files"]] == ["b.csv"]
    (tmp_path / "empty.csv").write_bytes(b"\xef\xbb\xbf")
    result = subprocess.run([sys.executable, "-m", "pipeline.download", "--input", str(tmp_path / "empty.csv"), "--output", str(tmp_path / "o2")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # after the log lines
    assert errors == [result.stderr.strip().splitlines()[-1]] and "empty.csv" in errors[0] and "no rows" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_utf16_list_is_a_clear_error(tmp_path):
    (tmp_path / "urls.csv").write_bytes("url,caption\nhttp://h/1.jpg,a\n".encode("utf-16"))
    with pytest.raises(InputError, match="UTF-16.*UTF-8"):
        prepare(str(tmp_path / "urls.csv"), InputConfig(), Layout(str(tmp_path / "out")))


def test_address_kinds():
    from pipeline.fetch import network_kind

    kinds = {ip: network_kind(ip) for ip in ("93.184.216.34", "127.0.0.1", "::1", "::ffff:127.0.0.1", "10.1.2.3", "192.168.0.1",
                                             "172.16.0.1", "fd00::1", "169.254.169.254", "fe80::1%eth0", "0.0.0.0", "224.0.0.1", "2606:4700::1111")}
    assert kinds == {"93.184.216.34": "", "127.0.0.1": "loopback", "::1": "loopback", "::ffff:127.0.0.1": "loopback",
                     "10.1.2.3": "private", "192.168.0.1": "private", "172.16.0.1": "private", "fd00::1": "private",
                     "169.254.169.254": "link_local", "fe80::1%eth0": "link_local", "0.0.0.0": "reserved", "224.0.0.1": "reserved",
                     "2606:4700::1111": ""}


# ---------------------------------------------------------------------------- metadata filters and subsets


LAION_FILTERS = ['NSFW == "UNLIKELY"', "punsafe < 0.1", "similarity >= 0.28", "WIDTH >= 64", "HEIGHT >= 64"]


def test_laion_metadata_filters_reject_before_download(tmp_path):
    table = pa.table({
        "url": [f"http://h/{i}.jpg" for i in range(7)], "caption": ["a shirt"] * 7,
        "NSFW": ["UNLIKELY", "NSFW", "UNLIKELY", "UNLIKELY", "UNLIKELY", None, "UNLIKELY"],
        "punsafe": [0.01, 0.01, 0.5, 0.01, 0.01, 0.01, None],
        "similarity": [0.30, 0.30, 0.30, 0.20, 0.30, 0.30, 0.30],
        "WIDTH": [64, 64, 64, 64, 32, 64, 64], "HEIGHT": [64, 64, 64, 64, 64, 64, 64],
    })
    pq.write_table(table, tmp_path / "urls.parquet")
    layout = Layout(str(tmp_path / "out"))
    index = prepare(str(tmp_path / "urls.parquet"), InputConfig(filters=LAION_FILTERS), layout)
    rows = pq.read_table(layout.input_part(0)).to_pylist()
    assert [r["reject"] for r in rows] == ["", "metadata_NSFW", "metadata_punsafe", "metadata_similarity", "metadata_WIDTH",
                                          "metadata_NSFW", "metadata_punsafe"]  # a missing value does not pass
    assert [r["fetch_url"] for r in rows] == ["http://h/0.jpg"] + [""] * 6  # filtered rows are never fetched
    assert index["rejected"] == {"metadata_NSFW": 2, "metadata_punsafe": 2, "metadata_similarity": 1, "metadata_WIDTH": 1}


def test_filters_name_missing_columns_and_bad_expressions(tmp_path):
    from pipeline.core import config
    from pipeline.core.config import ConfigError

    pq.write_table(pa.table({"url": ["http://h/1.jpg"], "caption": ["a"]}), tmp_path / "urls.parquet")
    with pytest.raises(InputError, match=r"missing column\(s\) \['punsafe'\].*input.filters"):
        prepare(str(tmp_path / "urls.parquet"), InputConfig(filters=["punsafe < 0.1"]), Layout(str(tmp_path / "out")))
    with pytest.raises(ConfigError, match="COLUMN OP VALUE"):
        config.load(InputConfig, None, ["filters=[punsafe ~ 0.1]"])


def test_a_datacomp_subset_is_written_from_a_manifest_and_read_as_a_keep_list(tmp_path):
    from pipeline.subset import UID_DTYPE, read_subset, write_subset

    urls = [f"http://h/{i}.jpg" for i in range(6)]
    pq.write_table(pa.table({"url": urls, "caption": ["a shirt"] * 6}), tmp_path / "urls.parquet")
    first = Layout(str(tmp_path / "first"))
    prepare(str(tmp_path / "urls.parquet"), InputConfig(), first)
    uids = pq.read_table(first.input_part(0))["uid"].to_pylist()
    manifest = pa.table({"uid": uids, "shard": [0, -1, 1, -1, 0, 0]})  # rows 0, 2, 4, 5 kept
    assert write_subset(manifest, str(tmp_path / "subset.npy")) == 4
    subset = np.load(tmp_path / "subset.npy")
    assert subset.dtype == UID_DTYPE and subset.ndim == 1
    expected = sorted((int(u[:16], 16), int(u[16:], 16)) for u in (uids[0], uids[2], uids[4], uids[5]))
    assert [tuple(map(int, p)) for p in subset] == expected  # DataComp's (high, low) uint64 pairs, sorted
    assert np.array_equal(read_subset(str(tmp_path / "subset.npy")), subset)
    second = Layout(str(tmp_path / "second"))
    index = prepare(str(tmp_path / "urls.parquet"), InputConfig(subset=str(tmp_path / "subset.npy")), second)
    assert [r["reject"] for r in pq.read_table(second.input_part(0)).to_pylist()] == ["", "not_in_subset", "", "not_in_subset", "", ""]
    assert index["rejected"] == {"not_in_subset": 2}


def test_rows_are_interleaved_by_host_across_parts_and_keep_their_row_numbers(tmp_path):
    urls = [f"http://a.example/{i}.jpg" for i in range(6)] + ["https://B.example:8443/0.jpg", "http://user@b.example/1.jpg",
                                                                "http://c.example/0.jpg", "not a url"]
    pq.write_table(pa.table({"url": urls, "caption": ["a shirt"] * len(urls)}), tmp_path / "urls.parquet")
    layout = Layout(str(tmp_path / "out"))
    index = prepare(str(tmp_path / "urls.parquet"), InputConfig(part_size=3), layout)
    parts = [pq.read_table(layout.input_part(p)).to_pylist() for p in range(index["parts"])]
    assert [[r["row"] for r in part] for part in parts] == [[0, 6, 8], [9, 1, 7], [2, 3, 4], [5]]  # a, b, c, none, a, b, a...
    single = Layout(str(tmp_path / "single"))
    prepare(str(tmp_path / "urls.parquet"), InputConfig(part_size=3, interleave_parts=0), single)
    assert pq.read_table(single.input_part(0))["row"].to_pylist() == [0, 1, 2]  # 0: list order


# ---------------------------------------------------------------------------- input formats


def test_every_input_format_gives_the_same_rows(tmp_path):
    """parquet, csv, tsv, jsonl, jsonl.gz, a folder of them and an fsspec URL (memory://) read the same list."""
    import gzip

    import fsspec

    rows = [{"url": f"http://h/{i}.jpg", "caption": f"a shirt, size {i}", "width": str(64 + i)} for i in range(5)]
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    csv_text = "url,caption,width\n" + "".join(f'{r["url"]},"{r["caption"]}",{r["width"]}\n' for r in rows)
    tsv_text = "url\tcaption\twidth\n" + "".join(f'{r["url"]}\t{r["caption"]}\t{r["width"]}\n' for r in rows)
    files = {"urls.parquet": None, "urls.csv": csv_text.encode(), "urls.tsv": tsv_text.encode(),
             "urls.jsonl": jsonl, "urls.jsonl.gz": gzip.compress(jsonl)}
    (tmp_path / "folder").mkdir()
    for i, line in enumerate(jsonl.splitlines(keepends=True)):  # a folder: one file per row, read in name order
        name = f"{i:02d}.{('jsonl', 'csv', 'tsv', 'jsonl.gz', 'parquet')[i]}"
        row = rows[i]
        data = {"jsonl": line, "csv": f'url,caption,width\n{row["url"]},"{row["caption"]}",{row["width"]}\n'.encode(),
                "tsv": f'url\tcaption\twidth\n{row["url"]}\t{row["caption"]}\t{row["width"]}\n'.encode(),
                "jsonl.gz": gzip.compress(line), "parquet": None}[name.split(".", 1)[1]]
        if data is None:
            pq.write_table(pa.Table.from_pylist([row]), tmp_path / "folder" / name)
        else:
            (tmp_path / "folder" / name).write_bytes(data)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    memory = fsspec.filesystem("memory")
    sources = {"folder": str(tmp_path / "folder"), "memory://": "memory://vlpipe-test/urls.jsonl.gz"}
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        sources[name] = str(tmp_path / name)
    memory.pipe("/vlpipe-test/urls.jsonl.gz", gzip.compress(jsonl))
    try:
        for label, source in sources.items():
            layout = Layout(str(tmp_path / "out" / label.replace("/", "").replace(":", "")))
            index = prepare(source, InputConfig(interleave_parts=0), layout)
            got = pq.read_table(layout.input_part(0)).to_pylist()
            assert index["rows"] == 5, label
            assert [(r["row"], r["url"], r["caption"], str(r["width"]), r["reject"]) for r in got] == \
                [(i, r["url"], r["caption"], r["width"], "") for i, r in enumerate(rows)], label
            assert [r["uid"] for r in got] == [derive_uid(r["url"], r["caption"]) for r in rows], label
    finally:
        memory.rm("/vlpipe-test", recursive=True)
