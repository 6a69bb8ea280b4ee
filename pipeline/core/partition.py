"""Partitioned intermediates: a map task's output cut by partition, read back one partition at a time.

A map task (one input part) writes one Arrow IPC file whose record batch ``i`` holds partition
``i`` (empty when the part sent nothing there), so the file appears atomically and a reduce task
(one partition) reads one batch of every part's file by its offset in the footer: constant work
per file, whatever the partition count (a parquet footer with a row group per partition is parsed
whole by every reader, so M maps x R reduces cost M x R^2). Plain files on any fsspec filesystem:
no shuffle service. ``components`` merges the pairs the reduce tasks found.
"""

from __future__ import annotations

import hashlib

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.core.io import atomic_write


def write_partitioned(path: str, tables: dict[int, pa.Table], partitions: int) -> None:
    """One file, record batch ``p`` = partition ``p`` of ``range(partitions)``, written atomically
    (no batch at all when no table has rows: every read finds nothing)."""
    tables = {p: t for p, t in tables.items() if t.num_rows}
    schema = next(iter(tables.values())).schema if tables else pa.schema([])
    with atomic_write(path) as f, pa.ipc.new_file(f, schema) as writer:
        for p in range(partitions if tables else 0):
            table = tables.get(p)
            writer.write_batch(table.combine_chunks().to_batches()[0] if table is not None
                               else pa.RecordBatch.from_pylist([], schema=schema))


def split(table: pa.Table, partition: np.ndarray) -> dict[int, pa.Table]:
    """``table``'s rows by their ``partition`` (rows keep their order within one): one stable sort and
    zero-copy slices, so the cost does not grow with the partition count (a filter per partition does)."""
    order = np.argsort(partition, kind="stable")
    grouped, ordered = table.take(pa.array(order)), partition[order]
    present, starts, counts = np.unique(ordered, return_index=True, return_counts=True)
    return {int(p): grouped.slice(int(lo), int(n)) for p, lo, n in zip(present, starts, counts)}


def read_partition(paths: list[str], partition: int) -> pa.Table | None:
    """The rows of ``partition`` from every file (None when no file has any)."""
    found = []
    for path in paths:
        with fsspec.open(path, "rb") as f:
            reader = pa.ipc.open_file(f)
            if partition < reader.num_record_batches and (batch := reader.get_batch(partition)).num_rows:
                found.append(pa.Table.from_batches([batch]))
    return pa.concat_tables(found) if found else None


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over uint64: every input bit flips about half the output bits, so
    ``mix64(x) % partitions`` is balanced even for values whose low bits are constant (a key value
    masks a hash down to some of its blocks; a bare multiplicative hash kept those zeros in its
    low bits, and the largest of 480 partitions held 3.1x the mean)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """(n,) int64 partition of each uint64 key: its mix64 modulo the count."""
    return (mix64(keys) % np.uint64(partitions)).astype(np.int64)


def hash_partition(digests: np.ndarray, partitions: int) -> np.ndarray:
    """(n,) partition of each (n, k) uint8 digest (k a multiple of 8): its 8-byte words folded and mixed,
    so ids that differ only in their last bytes (a given uid counting up in hex) still spread evenly."""
    words = np.ascontiguousarray(digests).view("<u8")
    return partition_of(np.bitwise_xor.reduce(words, axis=1), partitions)


def hex_digests(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """(n, width // 2) uint8: the binary digests of a column of ``width``-char hex strings, vectorised."""
    array = pa.chunked_array([column]) if isinstance(column, pa.Array) else column
    array = pc.utf8_lower(array).combine_chunks() if array.num_chunks != 1 else pc.utf8_lower(array.chunk(0))
    if len(array) == 0:
        return np.zeros((0, width // 2), np.uint8)
    lengths = pc.utf8_length(array)
    if array.null_count or pc.min(lengths).as_py() != width or pc.max(lengths).as_py() != width:
        raise ValueError(f"expected {width}-character hex digests")
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset : array.offset + len(array) + 1]
    chars = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(-1, width)
    nibbles = np.where(chars >= ord("a"), chars - (ord("a") - 10), chars - ord("0")).astype(np.uint8)
    return nibbles[:, 0::2] << 4 | nibbles[:, 1::2]


def text_digests(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, 16) uint8 blake2b digests of free text (captions: no fixed-width id to decode)."""
    values = column.to_pylist()
    out = np.empty((len(values), 16), np.uint8)
    for i, v in enumerate(values):
        out[i] = np.frombuffer(hashlib.blake2b((v or "").encode(), digest_size=16).digest(), np.uint8)
    return out


def components(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of (M, 2) int64 node pairs: (nodes, root of each), the root being the
    smallest node of its component. Memory is linear in the pairs, not in the node id range."""
    if len(pairs) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, index = np.unique(pairs.ravel(), return_inverse=True)
    index = index.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(index), np.int8), (index[:, 0], index[:, 1])), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(graph, directed=True, connection="weak")
    _, first = np.unique(labels, return_index=True)  # nodes are sorted: a label's first node is its smallest
    return nodes, nodes[first][labels]
