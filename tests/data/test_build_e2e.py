"""The data stage end to end: img2dataset against the embedded pool served on 127.0.0.1.

A subset keeps it short: every planted fault, the rows the copies point to, and clean rows.
The uninterrupted build runs through the CLI in a subprocess; so does the killed-and-resumed one.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline import build_shards
from pipeline.core import config
from pipeline.embedded import load_pool
from pipeline.serve import serve_pool

pytestmark = pytest.mark.slow
CLEAN_ROWS = 150
OVERRIDES = [
    "input.part_size=150", "download.processes=1", "download.threads=16", "download.timeout=5",
    "clip_score.fraction=null", "clip_score.threshold=-1.0", "clip_score.workers=0",  # score only: dedupe sees every copy
    "reshard.target_shard_size=100", "log_level=WARNING",
]
# planted fault -> (step, reason) it must be counted under; the photos' crops are only caught as semantic_dup
EXPECTED = {
    "http_404": ("download", "http_404"), "http_500": ("download", "http_500"), "noai": ("download", "noai"),
    "not_image": ("basic", "not_image"), "truncated": ("basic", "truncated"),
    "decompression_bomb": ("basic", "decompression_bomb"), "empty_caption": ("basic", "empty_caption"),
    "whitespace_caption": ("basic", "whitespace_caption"), "long_caption": ("basic", "long_caption"),
    "eval_copy": ("decontaminate", "eval_copy"), "duplicate_row": ("dedupe", "duplicate_row"),
    "exact_dup": ("dedupe", "exact_dup"), "near_dup": ("dedupe", ("near_dup", "semantic_dup")),
}


def subset(pool):
    faulty = pc.is_in(pool["fault"], pa.array(list(EXPECTED)))
    originals = pc.is_in(pool["id"], pool.filter(faulty)["dup_of"])
    clean = np.flatnonzero(pool["fault"].to_numpy(zero_copy_only=False) == "")[::60][:CLEAN_ROWS]
    keep = np.asarray(pc.or_(faulty, originals)).copy()
    keep[clean] = True
    return pool.filter(keep)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pool = subset(load_pool(with_content=True))
    with serve_pool(pool=pool, max_seconds=600) as server:
        urls = server.write_url_list(tmp_path_factory.mktemp("list") / "urls.parquet")
        yield pool.drop_columns(["content"]), urls


def build_command(urls, out):
    return [sys.executable, "-m", "pipeline.build_shards", "--input", str(urls), "--output", str(out), *OVERRIDES]


@pytest.fixture(scope="module")
def built(served, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "out"
    subprocess.run(build_command(served[1], out), check=True, timeout=300, stdout=subprocess.DEVNULL)
    return out


def test_every_planted_fault_is_counted_under_its_reason(served, built):
    pool, _ = served
    stats = json.loads((built / "stats.json").read_text())
    manifest = pq.read_table(built / "manifest.parquet").to_pandas().set_index("id")
    truth = pool.to_pandas().set_index("id")
    assert stats["input_rows"] == len(manifest) == len(truth) and manifest["row"].is_unique
    assert (truth.fault == "near_dup").sum() == 108 and (truth.fault == "eval_copy").sum() == 40  # the README's counts
    for fault, (step, reasons) in EXPECTED.items():
        reasons = reasons if isinstance(reasons, tuple) else (reasons,)
        rows = manifest.loc[truth.index[truth.fault == fault]]
        counted = ((rows.dropped_by == step) & rows.reason.isin(reasons)).sum()
        assert counted == len(rows), (fault, rows[["dropped_by", "reason"]].value_counts())  # README: 108/108 near dups
        assert sum(stats["dropped"][step].get(reason, 0) for reason in reasons) >= counted
    assert (manifest.loc[truth.index[truth.fault == ""], "shard"] >= 0).all()  # no clean row lost
    kept = manifest[manifest.shard >= 0]
    assert (kept.reason == "").all() and (manifest[manifest.shard < 0].reason != "").all()


def test_shards_read_by_webdataset_and_match_sizes(built):
    sizes = json.loads((built / "sizes.json").read_text())
    manifest = pq.read_table(built / "manifest.parquet").to_pandas()
    for name, size in sizes.items():
        samples = list(wds.WebDataset(str(built / name), shardshuffle=False).decode("pil"))
        assert len(samples) == size > 0
        assert all({"jpg", "txt", "json"} <= set(s) or {"png", "txt", "json"} <= set(s) for s in samples)
        index = int(name.split("/")[-1].split(".")[0])
        assert sorted(s["__key__"] for s in samples) == sorted(manifest.uid[manifest.shard == index])


def kill_points(index: dict, cfg) -> dict[str, list[tuple[str, str]]]:
    """(moment, the file whose appearance marks it) per stage group, in build order: a kill a moment
    after the file appears lands inside that stage (or just after it)."""
    last = index["parts"] - 1
    shard_marks, dataset_marks = [], []
    for name in cfg.steps:
        shard_marks.append((f"{name} shard phase", f"steps/{name}/000000.parquet"))
        if build_shards.STEPS.get(name).has_dataset_phase:
            dataset_marks.append((f"{name} dataset phase", f"steps/{name}/{last:06d}.parquet"))
    return {
        "download": [("prepare", "input"), ("download", "download/000000_stats.json"), ("download", f"download/{last:06d}.parquet")],
        "shard phases": shard_marks, "dataset phases": dataset_marks,
        "reshard": [("reshard shards", "reshard_plan.parquet"), ("reshard shards", "shards/000000.tar"),
                    ("reshard dataset", "sizes.json"), ("reshard dataset", "manifest.parquet")],
    }


def output_bytes(out):
    """Every final output's bytes (tars as files: member order, headers and mtimes included)."""
    names = ["manifest.parquet", "stats.json", "sizes.json", *(f"shards/{p.name}" for p in sorted((out / "shards").glob("*.tar")))]
    return {name: (out / name).read_bytes() for name in names}


def test_killed_build_resumes_to_an_identical_output(served, built, tmp_path):
    """kill -9 at one drawn moment per stage group (download, a step's shard phase, a dataset phase,
    reshard), resuming after each; the final outputs equal the uninterrupted build's byte for byte."""
    import random

    seed = int(os.environ.get("VLPIPE_KILL_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)
    cfg = config.load(build_shards.BuildConfig, config.CONFIG_ROOT / "data" / "default.yaml", OVERRIDES)
    points = [(group, *rng.choice(marks), rng.uniform(0.0, 0.5)) for group, marks in kill_points(json.loads((built / "input" / "index.json").read_text()), cfg).items()]
    out = tmp_path / "out"
    command = build_command(served[1], out)
    history = []
    about = lambda: f"seed {seed} (rerun: VLPIPE_KILL_SEED={seed}); kills: {history}"  # noqa: E731
    for group, moment, mark, delay in points:
        process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while not (out / mark).exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the build and img2dataset's workers
            history.append(f"{moment} ({mark} + {delay:.2f} s)")
        else:
            history.append(f"{moment}: ended (rc {process.returncode}) before the kill")
        process.wait()
        assert process.returncode in (0, -signal.SIGKILL), about()
    subprocess.run(command, check=True, timeout=300, stdout=subprocess.DEVNULL)
    print(about())
    expected, got = output_bytes(built), output_bytes(out)
    assert sorted(got) == sorted(expected), about()
    for name in expected:
        assert got[name] == expected[name], f"{name} differs; {about()}"


class SlowThenImage(BaseHTTPRequestHandler):
    """/slow sleeps past the download timeout; anything else is a real image."""

    image = None

    def do_GET(self):  # noqa: N802
        if self.path == "/slow":
            time.sleep(4)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *args):
        pass


def test_timeouts_and_refused_connections_are_counted_skips(tmp_path):
    pool = load_pool(with_content=True)
    SlowThenImage.image = pool.filter(pc.equal(pool["fault"], ""))["content"][0].as_py()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowThenImage)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        (tmp_path / "urls.jsonl").write_text("".join(json.dumps({"url": u, "caption": "a t-shirt"}) + "\n" for u in
                                                    (f"{base}/slow", f"http://127.0.0.1:{refused_port}/x.jpg", f"{base}/ok.jpg")))
        cfg = config.load(build_shards.BuildConfig, config.CONFIG_ROOT / "data" / "default.yaml",
                          ["download.timeout=1", "download.processes=1", "download.threads=4", "steps=[]",
                           "reshard.workers_per_gpu=1"])
        stats = build_shards.run(cfg, str(tmp_path / "out"), str(tmp_path / "urls.jsonl"))
    finally:
        server.shutdown()
    assert stats["kept"] == 1
    assert stats["dropped"] == {"download": {"timeout": 1, "connection_refused": 1}}
