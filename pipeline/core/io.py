"""File helpers shared by every stage: fsspec paths, atomic writes, JSON and parquet."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import infer_compression


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


@contextlib.contextmanager
def arrow_file(path: str, compression: str | None = None) -> Iterator[pa.NativeFile]:
    """``path`` as a file Arrow reads without calling back into Python. Given a Python file object,
    Arrow reads on its IO threads into Python-owned buffers, and a thread that drops one after the
    read has returned takes the GIL; if the interpreter is exiting by then, the thread is killed
    inside C++ and the process aborts (SIGABRT, "terminate called without an active exception"):
    a task that had done its work fails its Slurm job. A local file is opened by Arrow itself; a URL
    (or a compressed file, ``compression`` as fsspec names it) is copied whole into Arrow memory."""
    path = str(path)
    if compression == "infer":
        compression = infer_compression(path)
    if is_local(path) and compression is None:
        with pa.OSFile(path.removeprefix("file://")) as f:
            yield f
        return
    with fsspec.open(path, "rb", compression=compression) as f:
        sink = pa.BufferOutputStream()
        shutil.copyfileobj(f, sink, 1 << 24)
    yield pa.BufferReader(sink.getvalue())


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    with arrow_file(path) as f:
        return pq.ParquetFile(f).read(columns=columns)


def write_parquet(path: str, table: pa.Table) -> None:
    with atomic_write(path) as f:
        pq.write_table(table, f)
