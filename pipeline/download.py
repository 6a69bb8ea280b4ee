"""Download stage: img2dataset (called as a library) turns the input parts into WebDataset shards.

    python -m pipeline.download --input URLS --output DIR [--config FILE] [--task I/N] [key=value ...]

URLS is parquet, csv, tsv or jsonl(.gz), a file or a folder, local or fsspec. Input part ``p``
becomes ``DIR/download/{p}.tar`` (+ ``.parquet`` with every row's status, ``_stats.json``).
img2dataset's X-Robots-Tag opt-out handling stays on. A killed run resumes: finished shards
are kept, unfinished ones are downloaded again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
from typing import Any

import fsspec
import pyarrow.parquet as pq

from pipeline.core import config
from pipeline.core.io import exists
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
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # any other img2dataset.download keyword

    def validate(self) -> None:
        unknown = sorted(set(self.allowed_networks) - set(NETWORK_KINDS))
        if unknown:
            raise ValueError(f"allowed_networks: unknown kind(s) {unknown} (known: {', '.join(NETWORK_KINDS)})")
        if self.per_host < 0:
            raise ValueError("per_host must be >= 0 (0: no cap)")

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


def download(layout: Layout, parts: range, cfg: DownloadConfig, part_size: int, extra_columns: list[str]) -> None:
    """Download every part of ``parts`` that is not done yet, in one img2dataset call."""
    todo = pending_parts(layout, parts)
    if not todo:
        log.info("download: parts %s already done", _span(parts))
        return
    from pipeline import downloader  # imports img2dataset, which is slow to import

    fs, _ = fsspec.core.url_to_fs(layout.root)
    tag = hashlib.sha256(",".join(map(str, todo)).encode()).hexdigest()[:10]
    work = f"{layout.root}/download/_work/{todo[0]:06d}-{todo[-1]:06d}-{tag}"
    for j, part in enumerate(todo):  # a folder of the parts: img2dataset names shard j after the j-th file
        link = f"{work}/input/{j:06d}.parquet"
        if not fs.exists(link):
            fs.makedirs(f"{work}/input", exist_ok=True)
            fs.copy(layout.input_part(part), link)
    os.environ["CV_IO_MAX_IMAGE_PIXELS"] = str(cfg.max_pixels)  # read by OpenCV in img2dataset's worker processes
    log.info("download: %d parts (%s) with img2dataset, %d processes x %d threads", len(todo), _span(todo), cfg.processes, cfg.threads)
    options = dict(
        url_list=f"{work}/input", output_folder=f"{work}/out", input_format="parquet", output_format="webdataset",
        url_col="fetch_url", caption_col="caption", save_additional_columns=["row", "uid", *extra_columns],
        number_sample_per_shard=part_size, processes_count=cfg.processes, thread_count=cfg.threads,
        timeout=cfg.timeout, retries=cfg.retries, distributor=cfg.distributor, compute_hash="sha256",
        incremental_mode="incremental", enable_wandb=False,
    )
    downloader.download(cfg.policy(), **{**options, **cfg.options})
    for j, part in enumerate(todo):
        for suffix in DOWNLOAD_SUFFIXES:
            fs.mv(f"{work}/out/{j:05d}{suffix}", layout.download(part, suffix))
    fs.rm(work, recursive=True)


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
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config.from_args(DownloadCommand, args)
    setup_logging(cfg.log_level)
    layout = Layout(args.output)
    index = prepare(args.input, cfg.input, layout)
    download(layout, task_range(args.task, index["parts"]), cfg.download, index["part_size"], extra_columns(layout))


if __name__ == "__main__":
    run_command(main)
