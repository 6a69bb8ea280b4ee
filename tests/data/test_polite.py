"""Polite downloading against a busy server on 127.0.0.1, through img2dataset: at most ``per_host``
requests to one host at once, 429 and 503 counted as their own reasons with their Retry-After, and
``python -m pipeline.download --retry-failed`` fetching exactly those rows again."""

import email.utils
import io
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core.shards import Layout, samples
from pipeline.download import error_reason, retry_after

pytestmark = pytest.mark.slow


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (20, 120, 200)).save(out, "PNG")
    return out.getvalue()


class Busy(BaseHTTPRequestHandler):
    """/busy429/* and /busy503/* refuse their first request; /gone/* is a 404; the rest are images."""

    image = png()
    lock = threading.Lock()
    seen: Counter = Counter()
    in_flight: Counter = Counter()
    most_in_flight: Counter = Counter()
    refused_at: dict[str, float] = {}
    fetched_at: dict[str, float] = {}

    def do_GET(self):  # noqa: N802
        host = self.headers["Host"].split(":")[0]
        url = f"http://{self.headers['Host']}{self.path}"
        with self.lock:
            self.seen[url] += 1
            first = self.seen[url] == 1
            self.in_flight[host] += 1
            self.most_in_flight[host] = max(self.most_in_flight[host], self.in_flight[host])
        time.sleep(0.1)  # long enough for requests to overlap
        with self.lock:  # before the reply: once it is read, the client may start the next request
            self.in_flight[host] -= 1
        if first and self.path.startswith("/busy429/"):
            self.refused_at[url] = time.time()
            return self.reply(429, b"slow down", {"Retry-After": "1"})
        if first and self.path.startswith("/busy503/"):
            self.refused_at[url] = time.time()
            return self.reply(503, b"busy", {"Retry-After": email.utils.formatdate(time.time() + 1, usegmt=True)})
        if self.path.startswith("/gone/"):
            return self.reply(404, b"not found", {})
        self.fetched_at[url] = time.time()
        return self.reply(200, self.image, {"Content-Type": "image/png"})

    def reply(self, status, body, headers):
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_retry_after_is_read_as_seconds_or_a_date():
    now = time.time()
    assert retry_after("HTTP Error 429: Too Many Requests (Retry-After: 7)", now) == 7
    assert 29 <= retry_after(f"HTTP Error 503: x (Retry-After: {email.utils.formatdate(now + 30, usegmt=True)})", now) <= 31
    assert retry_after("HTTP Error 503: x (Retry-After: )", now) == retry_after(None, now) == 0
    assert error_reason("HTTP Error 429: Too Many Requests (Retry-After: 7)") == "http_429"


def test_busy_hosts_are_capped_and_their_rows_arrive_on_the_retry_pass(tmp_path):
    server = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 64})(("127.0.0.1", 0), Busy)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    paths = [f"/{kind}/{i}.png" for kind in ("ok", "busy429", "busy503", "gone") for i in range(4)]
    urls = [f"http://{host}:{port}{path}" for path in paths for host in ("127.0.0.1", "localhost")]
    (tmp_path / "urls.csv").write_text("url,caption\n" + "".join(f"{u},a blue square\n" for u in urls))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.download", "--input", str(tmp_path / "urls.csv"), "--output", str(out),
               "download.processes=1", "download.threads=16", "download.per_host=2", "download.timeout=5", "log_level=WARNING"]
    try:
        subprocess.run([*command, "download.retry_passes=0"], check=True, timeout=180, stdout=subprocess.DEVNULL)
        first = pq.read_table(Layout(str(out)).download(0, ".parquet")).to_pylist()
        assert Counter(error_reason(r["error_message"]) for r in first if r["status"] != "success") == {
            "http_429": 8, "http_503": 8, "http_404": 8}
        assert all("Retry-After: " in r["error_message"] for r in first if "/busy" in r["url"])
        assert set(Busy.most_in_flight) == {"127.0.0.1", "localhost"} and max(Busy.most_in_flight.values()) <= 2
        requests_before = sum(Busy.seen.values())

        subprocess.run([*command, "--retry-failed"], check=True, timeout=180, stdout=subprocess.DEVNULL)
    finally:
        server.shutdown()
    assert sum(Busy.seen.values()) - requests_before == 16  # only the 429 and 503 rows were fetched again
    after = {r["url"]: r for r in pq.read_table(Layout(str(out)).download(0, ".parquet")).to_pylist()}
    assert len(after) == len(urls) and {u for u, r in after.items() if r["status"] == "success"} == {
        u for u in urls if "/ok/" in u or "/busy" in u}
    assert len(Busy.refused_at) == 16 and all(Busy.fetched_at[u] - Busy.refused_at[u] >= 1 for u in Busy.refused_at)  # Retry-After honoured
    arrived = list(samples(Layout(str(out)).download(0, ".tar")))
    assert sorted(s["meta"]["url"] for s in arrived) == sorted(u for u, r in after.items() if r["status"] == "success")
    assert len({s["key"] for s in arrived}) == len(arrived)  # retried samples kept their own keys
