"""The manifest: one row per input row, with every score, the step that dropped it and why, and its shard.

Built per input part (joins of the part's files in pyarrow, no per-row Python), then streamed
into one file by pipeline/reshard.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.download import error_reason
from pipeline.core.io import read_parquet

# Per-step columns that stay out of the manifest (ids repeated, or only useful inside the step).
_SKIP = {"uid", "caption_norm", "part"}


def part_manifest(build, part: int, shard_of) -> pa.Table:
    """``build`` is a pipeline.build_shards.Build; ``shard_of(rows)`` gives each row's output shard (-1: dropped)."""
    layout = build.layout
    table = read_parquet(layout.input_part(part)).drop_columns(["fetch_url"])
    download = read_parquet(layout.download(part, ".parquet"), ["row", "status", "error_message"])
    table = table.join(download, "row", join_type="left outer")
    verdicts = []  # (step, reason column) in the order they decide
    for name, step in build.steps.items():
        own = read_parquet(layout.step(name, part))
        own = own.select([c for c in own.column_names if c not in _SKIP]).rename_columns(
            [f"{name}_reason" if c == "reason" else c for c in own.column_names if c not in _SKIP]
        )
        table = table.join(own, "row", join_type="left outer")
        verdicts.append((name, f"{name}_reason"))
        if step.has_dataset_phase:
            decided = read_parquet(layout.decisions(name, part)).rename_columns(["row", f"{name}_dataset_reason"])
            table = table.join(decided, "row", join_type="left outer")
            column = f"{name}_dataset_reason"
            table = table.set_column(table.column_names.index(column), column, pc.fill_null(table[column], ""))
            verdicts.append((name, column))
    table = table.sort_by("row")
    dropped_by, reason = _verdicts(table, verdicts)
    return table.append_column("dropped_by", dropped_by).append_column("reason", reason).append_column(
        "shard", shard_of(table["row"]))


def _verdicts(table: pa.Table, verdicts: list[tuple[str, str]]) -> tuple[pa.Array, pa.Array]:
    """(step, reason) of the first step that dropped each row, ("", "") if kept."""
    n = table.num_rows
    step, reason = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    decided = np.zeros(n, bool)

    def decide(mask: np.ndarray, name: str, why: np.ndarray) -> None:
        mask = mask & ~decided
        step[mask], reason[mask] = name, why[mask]
        decided[mask] = True

    reject = table["reject"].fill_null("").to_numpy(zero_copy_only=False)
    decide(reject != "", "prepare", reject)
    failed = np.asarray(pc.not_equal(table["status"].fill_null(""), "success"))
    messages = table["error_message"].filter(pa.array(failed & ~decided)).to_pylist()
    why = np.full(n, "", dtype=object)
    why[failed & ~decided] = [error_reason(m) for m in messages]  # failed downloads only: a regex per message
    decide(failed, "download", why)
    for name, column in verdicts:
        values = table[column].fill_null("").to_numpy(zero_copy_only=False)
        decide(values != "", name, values)
    return pa.array(step, pa.string()), pa.array(reason, pa.string())
