"""The manifest: one row per input row, with every score, the step that dropped it and why, and its shard."""

from __future__ import annotations

import pyarrow as pa

from pipeline.download import error_reason
from pipeline.core.io import read_parquet

# Per-step columns that stay out of the manifest (ids repeated, or only useful inside the step).
_SKIP = {"uid", "caption_norm", "part"}


def build_manifest(build, plan: pa.Table) -> pa.Table:
    """``build`` is a pipeline.build_shards.Build; ``plan`` maps kept rows to output shards."""
    shard_of = dict(zip(plan["row"].to_pylist(), plan["shard"].to_pylist()))
    return pa.concat_tables(  # a part holds rows of a run of parts, interleaved by host: sort again
        [_part(build, part, shard_of) for part in range(build.index["parts"])], promote_options="permissive"
    ).sort_by("row")


def _part(build, part: int, shard_of: dict[int, int]) -> pa.Table:
    layout = build.layout
    table = read_parquet(layout.input_part(part)).drop_columns(["fetch_url"])
    download = read_parquet(layout.download(part, ".parquet"), ["row", "status", "error_message"])
    table = table.join(download, "row", join_type="left outer")
    for name, step in build.steps.items():
        own = read_parquet(layout.step(name, part))
        own = own.select([c for c in own.column_names if c not in _SKIP]).rename_columns(
            [f"{name}_reason" if c == "reason" else c for c in own.column_names if c not in _SKIP]
        )
        table = table.join(own, "row", join_type="left outer")
        if step.has_dataset_phase:
            dropped = build._decisions(name)
            table = table.append_column(f"{name}_dataset_reason", pa.array([dropped.get(r, "") for r in table["row"].to_pylist()]))
    table = table.sort_by("row")
    dropped_by, reasons = zip(*(_verdict(row, build.steps) for row in table.to_pylist())) if table.num_rows else ((), ())
    rows = table["row"].to_pylist()
    return table.append_column("dropped_by", pa.array(dropped_by, pa.string())).append_column(
        "reason", pa.array(reasons, pa.string())
    ).append_column("shard", pa.array([shard_of.get(r, -1) for r in rows], pa.int64()))


def _verdict(row: dict, steps) -> tuple[str, str]:
    """(step, reason) of the first step that dropped the row, ("", "") if kept."""
    if row["reject"]:
        return "prepare", row["reject"]
    if row["status"] != "success":
        return "download", error_reason(row["error_message"])
    for name, step in steps.items():
        for key in (f"{name}_reason", f"{name}_dataset_reason"):
            if row.get(key):
                return name, row[key]
    return "", ""
