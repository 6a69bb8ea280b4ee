"""Download stage: img2dataset (called as a library) turns the input parts into WebDataset shards.

    python -m pipeline.download --input URLS --output DIR [--config FILE] [--task I/N] [key=value ...]

URLS is parquet, csv, tsv or jsonl(.gz), a file or a folder, local or fsspec. Input part ``p``
becomes ``DIR/download/{p}.tar`` (+ ``.parquet`` with every row's status, ``_stats.json``).
img2dataset's X-Robots-Tag opt-out handling stays on. A killed run resumes: finished shards
are kept, unfinished ones are downloaded again.

Rows that failed with a reason in ``download.retry_reasons`` (429 and 503 by default) are fetched
again on ``download.retry_passes`` retry passes, each after the longest ``Retry-After`` they were
given (at most ``download.max_retry_wait`` seconds); the part's files are rewritten with what
arrived and ``_stats.json`` counts the passes, so a resumed run does only the passes left.
``--retry-failed`` runs one more pass over finished parts, leaving every other row as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import email.utils
import hashlib
import io
import json
import os
import re
import tarfile
import time
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import config
from pipeline.core.io import atomic_write, exists, read_json, read_parquet, write_json, write_parquet
from pipeline.core.log import get_logger, setup_logging
from pipeline.core.shards import Layout
from pipeline.core.tasks import task_range
from pipeline.core.errors import run_command
from pipeline.fetch import NETWORK_KINDS, FetchPolicy
from pipeline.sources import INTERNAL, InputConfig, prepare

log = get_logger(__name__)
DOWNLOAD_SUFFIXES = (".tar", ".parquet", "_stats.json")  # moved in this order: the stats file marks "done"


@dataclasses.dataclass(kw_only=True)
class DownloadConfig:
    processes: int = 2
    threads: int = 32
    timeout: int = 10  # seconds per URL
    retries: int = 0
    max_pixels: int = 89_478_485  # decompression-bomb limit (PIL's default), also enforced while OpenCV decodes
    distributor: str = "multiprocessing"  # or pyspark / ray (img2dataset's own distributors)
    # Non-public address kinds that may be fetched (loopback, private, link_local, reserved); the
    # default serves tests and the demo from 127.0.0.1, production runs set [] (configs/data/production.yaml).
    allowed_networks: list[str] = dataclasses.field(default_factory=lambda: ["loopback"])
    per_host: int = 0  # concurrent requests to one host in each download process; 0: no cap
    retry_reasons: list[str] = dataclasses.field(default_factory=lambda: ["http_429", "http_503"])  # fetched again on a retry pass
    retry_passes: int = 1  # retry passes after the first download of a part
    max_retry_wait: float = 60.0  # seconds; a longer Retry-After is cut to this
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # any other img2dataset.download keyword

    def validate(self) -> None:
        unknown = sorted(set(self.allowed_networks) - set(NETWORK_KINDS))
        if unknown:
            raise ValueError(f"allowed_networks: unknown kind(s) {unknown} (known: {', '.join(NETWORK_KINDS)})")
        if self.per_host < 0:
            raise ValueError("per_host must be >= 0 (0: no cap)")
        if self.retry_passes < 0 or self.max_retry_wait < 0:
            raise ValueError("retry_passes and max_retry_wait must be >= 0")

    def policy(self) -> FetchPolicy:
        return FetchPolicy(allowed_networks=tuple(self.allowed_networks), per_host=self.per_host)


# img2dataset's error_message -> our reason; the first pattern that matches wins.
ERROR_REASONS = [
    (r"refused redirect|redirection to url .* is not allowed", "redirect_scheme"),
    (r"refused address", "refused_address"),
    (r"infinite loop", "redirect_loop"),
    (r"HTTP Error (\d+)", "http_{0}"),
    (r"X-Robots-Tag", "noai"),
    (r"timed out|timeout", "timeout"),
    (r"Connection refused", "connection_refused"),
    (r"Name or service not known|nodename nor servname|Temporary failure in name resolution", "dns_error"),
    (r"Connection reset|Remote end closed|RemoteDisconnected|IncompleteRead", "connection_error"),
    (r"CV_IO_MAX_IMAGE_PIXELS|image area too large", "decompression_bomb"),
    (r"Image decoding error", "undecodable"),
    (r"image too small", "too_small"),
    (r"aspect ratio too large", "aspect_ratio"),
    (r"unknown url type", "unsupported_url_scheme"),
]


def error_reason(message: str | None) -> str:
    """A short reason for an img2dataset failure ("download_error" when nothing matches)."""
    for pattern, reason in ERROR_REASONS:
        match = re.search(pattern, message or "", re.IGNORECASE)
        if match:
            return reason.format(*match.groups())
    return "download_error"


def pending_parts(layout: Layout, parts: range) -> list[int]:
    return [p for p in parts if not exists(layout.download(p, "_stats.json"))]


def download(layout: Layout, parts: range | list[int], cfg: DownloadConfig, part_size: int, extra_columns: list[str],
             retry: list[int] | None = None) -> None:
    """Download every part of ``parts`` that is not done yet, in one img2dataset call, then the retry
    passes left for the parts in ``retry`` (default: ``parts``)."""
    todo = pending_parts(layout, parts)
    if todo:
        work = _work_dir(layout, "_work", todo)
        fs, _ = fsspec.core.url_to_fs(layout.root)
        for j, part in enumerate(todo):  # a folder of the parts: img2dataset names shard j after the j-th file
            link = f"{work}/input/{j:06d}.parquet"
            if not fs.exists(link):
                fs.makedirs(f"{work}/input", exist_ok=True)
                fs.copy(layout.input_part(part), link)
        log.info("download: %d parts (%s) with img2dataset, %d processes x %d threads", len(todo), _span(todo), cfg.processes, cfg.threads)
        _img2dataset(work, cfg, part_size, extra_columns)
        for j, part in enumerate(todo):
            for suffix in DOWNLOAD_SUFFIXES:
                fs.mv(f"{work}/out/{j:05d}{suffix}", layout.download(part, suffix))
        fs.rm(work, recursive=True)
    else:
        log.info("download: parts %s already done", _span(parts))
    for _ in range(cfg.retry_passes):
        retry_failed(layout, list(parts if retry is None else retry), cfg, part_size, extra_columns, passes_below=cfg.retry_passes)


def _work_dir(layout: Layout, kind: str, parts: list[int]) -> str:
    tag = hashlib.sha256(",".join(map(str, parts)).encode()).hexdigest()[:10]
    return f"{layout.root}/download/{kind}/{parts[0]:06d}-{parts[-1]:06d}-{tag}"


def _img2dataset(work: str, cfg: DownloadConfig, part_size: int, extra_columns: list[str]) -> None:
    """img2dataset from ``work/input/{j}.parquet`` to ``work/out/{j}.tar|.parquet|_stats.json``."""
    from pipeline import downloader  # imports img2dataset, which is slow to import

    os.environ["CV_IO_MAX_IMAGE_PIXELS"] = str(cfg.max_pixels)  # read by OpenCV in img2dataset's worker processes
    options = dict(
        url_list=f"{work}/input", output_folder=f"{work}/out", input_format="parquet", output_format="webdataset",
        url_col="fetch_url", caption_col="caption", save_additional_columns=["row", "uid", *extra_columns],
        number_sample_per_shard=part_size, processes_count=cfg.processes, thread_count=cfg.threads,
        timeout=cfg.timeout, retries=cfg.retries, distributor=cfg.distributor, compute_hash="sha256",
        incremental_mode="incremental", enable_wandb=False,
    )
    downloader.download(cfg.policy(), **{**options, **cfg.options})


def retry_after(message: str | None, now: float) -> float:
    """Seconds to wait from ``now`` by the Retry-After a failure recorded (0 if none)."""
    match = re.search(r"Retry-After: ([^)]*)\)", message or "")
    value = match.group(1).strip() if match else ""
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return 0.0


def retry_failed(layout: Layout, parts: list[int], cfg: DownloadConfig, part_size: int, extra_columns: list[str],
                 passes_below: int | None = None) -> int:
    """One retry pass over the finished ``parts`` (those with fewer than ``passes_below`` passes, if
    given): re-fetch their rows that failed with a reason in ``cfg.retry_reasons``, after the longest
    Retry-After; returns the number of rows retried."""
    todo: dict[int, pa.Table] = {}
    now, wait = time.time(), 0.0
    for part in parts:
        if not exists(layout.download(part, "_stats.json")):
            continue
        if passes_below is not None and read_json(layout.download(part, "_stats.json")).get("retry_passes", 0) >= passes_below:
            continue
        status = read_parquet(layout.download(part, ".parquet"), ["row", "status", "error_message"])
        messages = status["error_message"].to_pylist()
        retry = [s != "success" and error_reason(m) in cfg.retry_reasons for s, m in zip(status["status"].to_pylist(), messages)]
        if any(retry):
            wait = max([wait] + [retry_after(m, now) for m, r in zip(messages, retry) if r])
            rows = status["row"].filter(pa.array(retry))
            source = read_parquet(layout.input_part(part))
            todo[part] = source.filter(pc.is_in(source["row"], rows))
        else:
            _count_pass(layout, part)
    if not todo:
        return 0
    wait = min(wait, cfg.max_retry_wait)
    retried = sum(t.num_rows for t in todo.values())
    log.info("download: retrying %d rows of %d parts in %.0f s (Retry-After)", retried, len(todo), wait)
    time.sleep(wait)
    work = _work_dir(layout, "_retry", list(todo))
    for j, table in enumerate(todo.values()):
        write_parquet(f"{work}/input/{j:06d}.parquet", table)
    _img2dataset(work, cfg, part_size, extra_columns)
    for j, part in enumerate(todo):
        _merge(layout, part, f"{work}/out/{j:05d}")
    fsspec.core.url_to_fs(layout.root)[0].rm(work, recursive=True)
    return retried


def _merge(layout: Layout, part: int, retried: str) -> None:
    """Replace the part's rows that were retried by their new outcome, under their old sample keys."""
    old, new = read_parquet(layout.download(part, ".parquet")), read_parquet(f"{retried}.parquet")
    key_of = dict(zip(old["row"].to_pylist(), old["key"].to_pylist()))
    renamed = {k: key_of[r] for k, r in zip(new["key"].to_pylist(), new["row"].to_pylist())}
    replaced = set(renamed.values())
    with fsspec.open(layout.download(part, ".tar"), "rb") as f:
        members = [(m.name, m, data) for m, data in _tar_members(f) if m.name.split(".", 1)[0] not in replaced]
    with fsspec.open(f"{retried}.tar", "rb") as f:
        for member, data in _tar_members(f):
            key, ext = member.name.split(".", 1)
            if ext == "json":
                data = json.dumps({**json.loads(data), "key": renamed[key]}).encode()
            members.append((f"{renamed[key]}.{ext}", member, data))
    with atomic_write(layout.download(part, ".tar")) as f, tarfile.open(fileobj=f, mode="w") as tar:
        for name, member, data in sorted(members, key=lambda m: m[0]):
            member.name, member.size = name, len(data)
            tar.addfile(member, io.BytesIO(data))
    new = new.set_column(new.schema.get_field_index("key"), "key", pa.array([renamed[k] for k in new["key"].to_pylist()], pa.string()))
    kept = old.filter(pc.invert(pc.is_in(old["row"], new["row"])))
    write_parquet(layout.download(part, ".parquet"), pa.concat_tables([kept, new.select(old.column_names)], promote_options="permissive").sort_by("key"))
    _count_pass(layout, part)


def _tar_members(f):
    with tarfile.open(fileobj=f, mode="r") as tar:
        for member in tar:
            if member.isfile():
                yield member, tar.extractfile(member).read()


def _count_pass(layout: Layout, part: int) -> None:
    stats = read_json(layout.download(part, "_stats.json"))
    write_json(layout.download(part, "_stats.json"), {**stats, "retry_passes": stats.get("retry_passes", 0) + 1})


def extra_columns(layout: Layout, sample_part: int = 0) -> list[str]:
    """The list's own columns that travel with every sample (uid, NSFW scores, trusted, ...)."""
    with fsspec.open(layout.input_part(sample_part), "rb") as f:
        names = pq.read_schema(f).names
    return [n for n in names if n not in INTERNAL]


def _span(parts) -> str:
    return f"{parts[0]}..{parts[-1]}" if len(parts) else "none"


@dataclasses.dataclass(kw_only=True)
class DownloadCommand:
    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    download: DownloadConfig = dataclasses.field(default_factory=DownloadConfig)
    log_level: str = "INFO"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="URL list: file or folder (parquet, csv, tsv, jsonl[.gz])")
    parser.add_argument("--output", required=True, help="output folder (local or fsspec URL)")
    parser.add_argument("--task", default="", help="I/N: download only the I-th of N slices of the parts (Slurm arrays)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="one more retry pass: re-fetch only the rows of finished parts that failed with a download.retry_reasons reason")
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config.from_args(DownloadCommand, args)
    setup_logging(cfg.log_level)
    layout = Layout(args.output)
    index = prepare(args.input, cfg.input, layout)
    parts = task_range(args.task, index["parts"])
    if args.retry_failed:
        retry_failed(layout, list(parts), cfg.download, index["part_size"], extra_columns(layout))
    else:
        download(layout, parts, cfg.download, index["part_size"], extra_columns(layout))


if __name__ == "__main__":
    run_command(main)
