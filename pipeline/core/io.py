"""File helpers shared by every stage: fsspec paths, atomic writes, JSON and parquet."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[Any]:
    """Write to a temporary name beside ``path`` and rename on success.

    A reader never sees a half-written file: on a local disk the rename is atomic; on object
    stores (s3://, gs://) an object only becomes visible when its upload completes.
    """
    path = str(path)
    if not is_local(path):
        with fsspec.open(path, mode) as f:
            yield f
        return
    path = path.removeprefix("file://")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(path: str) -> Any:
    with fsspec.open(str(path), "r") as f:
        return json.load(f)


def exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(str(path))
    return fs.exists(p)


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    with fsspec.open(str(path), "rb") as f:
        return read_parquet_file(f, columns)


def read_parquet_file(f: Any, columns: list[str] | None = None) -> pa.Table:
    """A parquet file object's table. Not ``pq.read_table``: its dataset scan can drop the file on an
    Arrow worker thread after it returns, and a process exiting then aborts ("terminate called without
    an active exception", apache/arrow#34314): a task that had done its work fails its Slurm job.
    ``use_threads=False`` too: a threaded read still aborted at exit once (tests/data/test_partitioned.py, in a full suite run)."""
    return pq.ParquetFile(f).read(columns=columns, use_threads=False)


def write_parquet(path: str, table: pa.Table) -> None:
    with atomic_write(path) as f:
        pq.write_table(table, f)
