"""A hostile URL list against a hostile server on 127.0.0.1, through img2dataset: every row ends kept
or counted with its reason, nothing crashes, and the output shards hold only ``<uid>.<ext>`` members.

One download run covers the whole corpus (servers, captions, files); the redirect and address
rules are also checked on the opener directly, where a request that must not happen can be seen.
"""

import io
import json
import re
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import build_shards
from pipeline.core import config
from pipeline.fetch import FetchPolicy, opener

pytestmark = pytest.mark.slow


def png(size=32) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), bytes(range(256)) * (size * size * 3 // 256)).save(out, "PNG")
    return out.getvalue()  # about 3 kB: a cut at 100 bytes is inside the pixel data


def animated_gif() -> bytes:
    out = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def corrupt_png() -> bytes:
    data = bytearray(png())
    start = data.find(b"IDAT") + 8
    data[start:start + 8] = b"\xff" * 8  # the header parses, the pixel data does not inflate
    return bytes(data)


def solid_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


HUGE_GIF = b"GIF89a" + (65535).to_bytes(2, "little") * 2 + b"\x00\x00\x00" + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
IMAGE = png()
REASON_IMAGES = {"/reasons/small.png": solid_png(8, 8), "/reasons/wide.png": solid_png(96, 16), "/reasons/corrupt.png": corrupt_png()}


class Hostile(BaseHTTPRequestHandler):
    """Answers by path; ``ftp_port`` is set by the fixture (a listener that must never be connected to)."""

    ftp_port = 0
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        path = urllib.parse.unquote(self.path)
        self.requests.append(path)
        if path in REASON_IMAGES:
            return self.reply(200, REASON_IMAGES[path], "image/png")
        if path.startswith("/img/") or path == "/busy" and self.requests.count(path) > 1:
            return self.reply(200, IMAGE, "image/png")
        if path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            return self.redirect(f"/chain/{left - 1}" if left else "/img/end-of-chain.png")
        redirects = {"/redirect/ftp": f"ftp://127.0.0.1:{self.ftp_port}/x.png", "/redirect/file": "file:///etc/passwd",
                     "/redirect/loop": "/redirect/loop", "/redirect/zero": f"http://0.0.0.0:{self.server.server_address[1]}/img/x.png"}
        if path in redirects:
            return self.redirect(redirects[path])
        if path == "/busy" and self.requests.count(path) == 1:  # refused once: the build's retry pass gets it
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path == "/stall":
            time.sleep(3)  # past the 1 s timeout
            return self.reply(200, IMAGE, "image/png")
        if path == "/closed-mid-body":
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE) * 4))
            self.end_headers()
            self.wfile.write(IMAGE[:100])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if path == "/short-content-length":  # says 100 bytes: the client reads a cut-short PNG
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(IMAGE)
            return None
        bodies = {"/html.jpg": (b"<html><body>not an image</body></html>", "image/jpeg"),
                  "/drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>', "image/svg+xml"),
                  "/huge.gif": (HUGE_GIF, "image/gif"), "/animated.gif": (animated_gif(), "image/gif")}
        if path in bodies:
            return self.reply(200, *bodies[path])
        return self.reply(404, b"not found", "text/plain")

    def reply(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, refused redirect)
            pass


@pytest.fixture(scope="module")
def server():
    ftp = socket.socket()
    ftp.bind(("127.0.0.1", 0))
    ftp.listen(8)
    ftp.settimeout(0.2)
    accepted = []

    def accept():
        while not stop.is_set():
            try:
                accepted.append(ftp.accept()[0])
            except OSError:
                pass

    stop = threading.Event()
    threading.Thread(target=accept, daemon=True).start()
    Hostile.ftp_port = ftp.getsockname()[1]
    httpd = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 64})(("127.0.0.1", 0), Hostile)  # the default 5 drops SYNs
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", accepted
    stop.set()
    httpd.shutdown()
    ftp.close()


KEPT = ("", "")
# path (or full caption case) -> (dropped_by, reason)
SERVER_CASES = {
    "/img/ok.png": KEPT,
    "/img/a photo with spaces.png": KEPT, "/img/ünïcödé/bild.png": KEPT, "/img/q.png?name=ä b": KEPT,
    "/chain/3": KEPT, "/chain/15": ("download", "redirect_loop"), "/redirect/loop": ("download", "redirect_loop"),
    "/redirect/ftp": ("download", "redirect_scheme"), "/redirect/file": ("download", "redirect_scheme"),
    "/redirect/zero": ("download", "refused_address"),
    "/stall": ("download", "timeout"), "/closed-mid-body": ("download", "connection_error"),
    "/short-content-length": ("basic", "truncated"), "/html.jpg": ("basic", "not_image"), "/drawing.svg": ("basic", "not_image"),
    "/huge.gif": ("basic", "decompression_bomb"), "/animated.gif": KEPT, "/busy": KEPT,
}
CAPTIONS = {
    "a shirt with a NUL \x00 byte": KEPT, "shirt " * 17000: ("basic", "long_caption"), "قميص أزرق 👕 a blue shirt": KEPT,
    "a blue\nshirt\r\n on two lines": KEPT,
}


@pytest.fixture(scope="module")
def built(server, tmp_path_factory):
    base, _ = server
    folder = tmp_path_factory.mktemp("hostile")
    rows = [{"url": base + path, "caption": "a red square"} for path in SERVER_CASES]
    rows += [{"url": f"{base}/img/caption-{i}.png", "caption": caption} for i, caption in enumerate(CAPTIONS)]
    rows.append({"url": f"http://0.0.0.0:{base.rsplit(':', 1)[1]}/img/direct.png", "caption": "a red square"})
    (folder / "list").mkdir()
    (folder / "list" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "list" / "b_empty.csv").write_bytes(b"")
    (folder / "list" / "c_bom.csv").write_bytes(f"\ufeffurl,caption\n{base}/img/bom.png,a red square\n".encode())
    (folder / "list" / "d_mixed.csv").write_bytes(
        f"url,caption\n{base}/img/utf8.png,café\n{base}/img/latin1.png,caf".encode() + "é\n".encode("latin-1"))
    cfg = config.load(build_shards.BuildConfig, config.CONFIG_ROOT / "data" / "default.yaml",
                      ["download.timeout=1", "download.processes=1", "download.threads=32", "steps=[basic]",
                       "reshard.workers_per_gpu=1", "input.part_size=100"])
    out = folder / "out"
    stats = build_shards.run(cfg, str(out), str(folder / "list"))
    return out, stats, base


def test_every_hostile_row_is_kept_or_counted_with_its_reason(built, server):
    out, stats, base = built
    manifest = {r["url"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    verdicts = {url: (r["dropped_by"], r["reason"]) for url, r in manifest.items()}
    expected = {base + path: verdict for path, verdict in SERVER_CASES.items()}
    expected.update({f"{base}/img/caption-{i}.png": verdict for i, verdict in enumerate(CAPTIONS.values())})
    expected.update({f"http://0.0.0.0:{base.rsplit(':', 1)[1]}/img/direct.png": ("download", "refused_address"),
                     f"{base}/img/bom.png": KEPT, f"{base}/img/utf8.png": KEPT, f"{base}/img/latin1.png": ("prepare", "invalid_utf8")})
    assert verdicts == expected
    assert stats["input_rows"] == len(expected) and stats["kept"] == sum(v == KEPT for v in expected.values())
    assert server[1] == [], "the ftp: redirect target was connected to"
    assert Hostile.requests.count("/busy") == 2 and Hostile.requests.count("/img/ok.png") == 1  # the retry pass fetched only the 429
    assert not [p for p in Hostile.requests if "direct.png" in p or p == "/img/x.png"], "a refused address was fetched"
    assert all(r["url"] == url for url, r in manifest.items())  # the url as listed, not as fetched


def test_shards_hold_only_uid_members_and_the_captions_as_given(built):
    out, _, base = built
    manifest = {r["uid"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist() if r["shard"] >= 0}
    members = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
    assert all(re.fullmatch(r"[0-9a-f]{32}\.(jpg|png|webp|gif|bmp|txt|json)", name) for name in members), sorted(members)
    assert {name.split(".")[0] for name in members} == set(manifest)
    for uid, row in manifest.items():
        assert members[f"{uid}.txt"].decode() == row["caption"]
    gif = next(uid for uid, r in manifest.items() if r["url"].endswith("/animated.gif"))
    assert f"{gif}.gif" in members and Image.open(io.BytesIO(members[f"{gif}.gif"])).n_frames == 2  # stored as served


def test_redirects_and_addresses_are_checked_before_any_connection(server):
    base, accepted = server
    port = base.rsplit(":", 1)[1]
    loopback_ok = opener(FetchPolicy())
    assert loopback_ok.open(f"{base}/chain/2", timeout=5).read() == IMAGE
    with pytest.raises(OSError, match="refused redirect to a ftp: URL"):
        loopback_ok.open(f"{base}/redirect/ftp", timeout=5)
    assert accepted == []
    production_cfg = config.load(build_shards.BuildConfig, config.CONFIG_ROOT / "data" / "production.yaml")
    assert production_cfg.download.allowed_networks == [] and production_cfg.download.per_host > 0
    production = opener(production_cfg.download.policy())
    before = len(Hostile.requests)
    for url in (f"http://localhost:{port}/img/by-name.png", f"{base}/img/by-address.png"):  # a name is checked once resolved
        with pytest.raises(urllib.error.URLError, match="refused address .*loopback"):
            production.open(url, timeout=5)
    assert len(Hostile.requests) == before, "a refused request reached the server"


# (url path, caption, trusted) -> (dropped_by, reason) under REASON_OVERRIDES; the uid column is given
REASON_ROWS = [
    ("/reasons/small.png", "a red square", True, ("basic", "too_small")),
    ("/reasons/wide.png", "a red square", True, ("basic", "aspect_ratio")),
    ("/reasons/corrupt.png", "a red square", True, ("basic", "corrupt_image")),
    ("/img/r-short.png", "ab", True, ("basic", "short_caption")),
    ("/img/r-one-word.png", "square", True, ("basic", "too_few_words")),
    ("/img/r-blocked.png", "a FORBIDDEN square", True, ("basic", "blocked_word")),
    ("/img/r-not-blocked.png", "a forbiddenly red square", True, KEPT),  # whole words only
    ("/img/r-untrusted.png", "a red square", False, ("basic", "not_trusted")),
    ("/img/r-bad-uid.png", "a red square", True, ("prepare", "invalid_uid")),
    ("/img/r-first.png", "A red, red square!", True, KEPT),
    ("/img/r-same-caption.png", "a red red  square", True, ("dedupe", "caption_dup")),  # normalised: the same caption
    ("/img/r-other.png", "a blue square", True, KEPT),
]
REASON_OVERRIDES = ["download.timeout=5", "download.processes=1", "download.threads=8", "steps=[basic,dedupe]",
                    "dedupe.levels=[rows,caption]", "basic.min_image_size=16", "basic.max_aspect_ratio=3.0",
                    "basic.min_caption_chars=3", "basic.min_caption_words=2", "basic.blocklist=[forbidden]",
                    "basic.require_true=[trusted]", "input.uid_col=key", "reshard.workers_per_gpu=1"]


def test_each_filter_reason_is_produced_and_counted(server, tmp_path):
    """Every basic-filter reason, a prepare invalid_uid and the caption dedupe level, each made on purpose by one row."""
    base, _ = server
    rows = [{"url": base + path, "caption": caption, "trusted": trusted, "key": "not-a-uid" if "bad-uid" in path else f"{i:032x}"}
            for i, (path, caption, trusted, _) in enumerate(REASON_ROWS)]
    (tmp_path / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.load(build_shards.BuildConfig, config.CONFIG_ROOT / "data" / "default.yaml", REASON_OVERRIDES)
    stats = build_shards.run(cfg, str(tmp_path / "out"), str(tmp_path / "urls.jsonl"))
    manifest = {r["url"]: (r["dropped_by"], r["reason"]) for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert manifest == {base + path: verdict for path, _, _, verdict in REASON_ROWS}
    counted: dict = {}
    for *_, (step, reason) in REASON_ROWS:
        if step:
            counted.setdefault(step, {})[reason] = counted.get(step, {}).get(reason, 0) + 1
    assert stats["dropped"] == counted and stats["kept"] == sum(v == KEPT for *_, v in REASON_ROWS)


@pytest.mark.parametrize("overrides, count", [
    (["reshard.min_shards=5"], 5),  # min_shards wins
    (["reshard.nodes=2", "reshard.gpus_per_node=2", "reshard.workers_per_gpu=2"], 8),  # every reader gets a shard
    (["reshard.target_shard_size=3", "reshard.min_shards=2"], None),  # ceil(kept / target) wins
])
def test_output_shard_count_and_equal_contiguous_runs_in_input_order(built, tmp_path, overrides, count):
    """max(min_shards, nodes x gpus x workers, ceil(kept / target)) shards, each an equal (within one)
    contiguous run of the survivors in input order; the reshard stage rerun on the built downloads."""
    import math
    import shutil

    source, stats, _ = built
    for name in ("input", "download", "steps"):
        shutil.copytree(source / name, tmp_path / name)
    cfg = config.load(build_shards.BuildConfig, config.CONFIG_ROOT / "data" / "default.yaml",
                      ["steps=[basic]", "reshard.workers_per_gpu=1", *overrides])
    count = count or math.ceil(stats["kept"] / 3)
    assert count > 1 and stats["kept"] >= count
    again = build_shards.run(cfg, str(tmp_path), stages=["reshard"])
    assert again["shards"] == count and again["kept"] == stats["kept"]
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert list(sizes) == [f"shards/{i:06d}.tar" for i in range(count)] and max(sizes.values()) - min(sizes.values()) <= 1
    kept = sorted((r["row"], r["uid"]) for r in pq.read_table(tmp_path / "manifest.parquet").to_pylist() if r["shard"] >= 0)
    in_shards = []
    for name, size in sizes.items():
        with tarfile.open(tmp_path / name) as tar:
            uids = list(dict.fromkeys(m.name.split(".")[0] for m in tar))
        assert len(uids) == size
        in_shards += uids
    assert in_shards == [uid for _, uid in kept]  # shard 0 holds the first survivors, and so on
    too_many = config.load(build_shards.BuildConfig, config.CONFIG_ROOT / "data" / "default.yaml",
                           ["steps=[basic]", f"reshard.min_shards={stats['kept'] + 1}"])
    shutil.rmtree(tmp_path / "shards"), (tmp_path / "reshard_plan.parquet").unlink()
    with pytest.raises(ValueError, match="fewer than the"):
        build_shards.run(too_many, str(tmp_path), stages=["reshard"])
