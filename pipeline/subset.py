"""DataComp-style subset files: the kept uids as a sorted ``.npy`` of 128-bit uids.

    python -m pipeline.subset --manifest DIR/manifest.parquet --output subset.npy

The format is DataComp's: a 1-d structured array of dtype ``u8,u8`` (the uid's first and last 16
hex digits as unsigned 64-bit integers), sorted. ``input.subset=FILE`` reads one as a keep-list in
prepare (rows not in it are ``not_in_subset``, never fetched); this command writes one from a
build's manifest (the rows it kept).
"""

from __future__ import annotations

import argparse

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.errors import UserError, run_command
from pipeline.core.io import atomic_write, read_parquet

UID_DTYPE = np.dtype("u8,u8")


def uid_pairs(uids: list[str]) -> np.ndarray:
    """32-hex-digit uids as DataComp's (high, low) uint64 pairs, in the given order."""
    words = np.frombuffer(bytes.fromhex("".join(uids)), dtype=">u8").astype(np.uint64).reshape(-1, 2)
    pairs = np.empty(len(uids), UID_DTYPE)
    pairs["f0"], pairs["f1"] = words[:, 0], words[:, 1]
    return pairs


def read_subset(path: str) -> np.ndarray:
    """A subset file as a sorted array of uid pairs."""
    try:
        with fsspec.open(path, "rb") as f:
            pairs = np.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read subset file {path!r}: {err}") from None
    if pairs.dtype != UID_DTYPE or pairs.ndim != 1:
        raise UserError(f"{path}: a subset file is a 1-d numpy array of dtype u8,u8 (DataComp's), got {pairs.dtype} {pairs.shape}")
    high, low = pairs["f0"], pairs["f1"]  # numpy has no < for structured arrays, only sort and searchsorted
    ordered = np.all((high[:-1] < high[1:]) | ((high[:-1] == high[1:]) & (low[:-1] <= low[1:])))
    return pairs if ordered else np.sort(pairs)


def contains(subset: np.ndarray, uids: list[str]) -> np.ndarray:
    """Which of ``uids`` (valid 32-hex-digit uids) are in the sorted ``subset``."""
    pairs = uid_pairs(uids)
    at = np.minimum(np.searchsorted(subset, pairs), max(len(subset) - 1, 0))
    return (subset[at] == pairs) if len(subset) else np.zeros(len(uids), bool)


def write_subset(manifest: pa.Table, path: str) -> int:
    """Write the kept rows' uids (``shard >= 0``) of a manifest as a subset file; returns their count."""
    kept = manifest.filter(pc.greater_equal(manifest["shard"], 0))["uid"].to_pylist()
    pairs = np.sort(uid_pairs(kept))
    with atomic_write(path) as f:
        np.save(f, pairs)
    return len(pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="a build's manifest.parquet")
    parser.add_argument("--output", required=True, help="the subset file to write (.npy)")
    args = parser.parse_args(argv)
    print(f"{write_subset(read_parquet(args.manifest, ['uid', 'shard']), args.output)} uids written to {args.output}")


if __name__ == "__main__":
    run_command(main)
