"""Serve the embedded pool over HTTP on 127.0.0.1, so downloads fetch real URLs.

    python -m pipeline.serve --urls urls.parquet [--port 0] [--max-seconds 1800]

The server answers each pool row as the web would: the image bytes, a 404, a 500, or the
bytes with an ``X-Robots-Tag: noai`` header. It binds a free loopback port, runs in a
background thread and stops by itself after ``max_seconds`` (or when the ``with`` block ends).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.embedded import load_pool
from pipeline.core.log import get_logger, setup_logging

log = get_logger(__name__)
_CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        status, headers, body = self.routes.get(self.path.lstrip("/"), (404, {}, b"not found"))
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # requests are not worth a log line each
        pass


def pool_routes(pool: pa.Table) -> dict[str, tuple[int, dict[str, str], bytes]]:
    """URL path -> (status, headers, body) for every row of the pool."""
    routes = {}
    for row in pool.select(["path", "http", "content"]).to_pylist():
        if row["content"] is None and row["http"] not in ("404", "500"):
            continue  # a repeated URL (duplicate_row) answers like the row that holds its bytes
        ctype = {"Content-Type": _CONTENT_TYPES.get(Path(row["path"]).suffix, "application/octet-stream")}
        if row["http"] == "404":
            routes[row["path"]] = (HTTPStatus.NOT_FOUND, {}, b"not found")
        elif row["http"] == "500":
            routes[row["path"]] = (HTTPStatus.INTERNAL_SERVER_ERROR, {}, b"server error")
        elif row["http"] == "noai":
            routes[row["path"]] = (HTTPStatus.OK, {**ctype, "X-Robots-Tag": "noai"}, row["content"])
        else:
            routes[row["path"]] = (HTTPStatus.OK, ctype, row["content"])
    return routes


class PoolServer:
    """A running server; ``base_url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, routes: dict, pool: pa.Table, port: int = 0):
        handler = type("PoolHandler", (_Handler,), {"routes": routes})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.pool = pool
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="pool-server", daemon=True)

    def url_table(self, extra_columns: tuple[str, ...] = ("id", "trusted")) -> pa.Table:
        """The LAION-style list: ``url``, ``caption`` and extra columns carried through the pipeline."""
        urls = [f"{self.base_url}/{p}" for p in self.pool.column("path").to_pylist()]
        columns = {"url": urls, "caption": self.pool.column("caption")}
        columns.update({name: self.pool.column(name) for name in extra_columns})
        return pa.table(columns)

    def write_url_list(self, path: str | Path, format: str | None = None, extra_columns: tuple[str, ...] = ("id", "trusted")) -> Path:
        """Write the URL list as parquet, csv or jsonl (chosen by ``format`` or the file suffix)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = self.url_table(extra_columns)
        format = format or path.suffix.lstrip(".")
        if format == "parquet":
            pq.write_table(table, path)
        elif format == "csv":
            pacsv.write_csv(table, path)
        elif format == "jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
        else:
            raise ValueError(f"unknown URL list format {format!r} (parquet, csv or jsonl)")
        return path


@contextlib.contextmanager
def serve_pool(port: int = 0, max_seconds: float = 3600, pool: pa.Table | None = None) -> Iterator[PoolServer]:
    """Serve ``pool`` (default: the embedded pool) until the block ends or ``max_seconds`` pass."""
    pool = load_pool(with_content=True) if pool is None else pool
    server = PoolServer(pool_routes(pool), pool.drop_columns(["content"]), port)
    server.thread.start()
    deadline = threading.Timer(max_seconds, server.httpd.shutdown)
    deadline.daemon = True
    deadline.start()
    log.info("serving %d pool rows at %s (stops after %.0f s)", pool.num_rows, server.base_url, max_seconds)
    try:
        yield server
    finally:
        deadline.cancel()
        server.httpd.shutdown()
        server.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=Path, help="write the URL list here (.parquet, .csv or .jsonl)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--max-seconds", type=float, default=1800)
    args = parser.parse_args()
    setup_logging()
    with serve_pool(args.port, args.max_seconds) as server:
        if args.urls:
            server.write_url_list(args.urls)
            log.info("wrote %s", args.urls)
        print(server.base_url, flush=True)
        try:
            while server.thread.is_alive():
                server.thread.join(1.0)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
