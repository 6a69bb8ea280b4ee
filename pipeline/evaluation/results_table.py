"""Merge evaluation JSON files into one CSV and one markdown table.

    python -m pipeline.evaluation.results_table RUN_DIR/eval OTHER_RUN/eval ... --output results

writes ``results.csv`` and ``results.md``: one row per (model, dataset, task), one column
per metric (the union over rows; empty where a task does not report it).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path

from pipeline.core.io import atomic_write, read_json
from pipeline.core.errors import UserError, run_command

FIXED = ["model", "step", "dataset", "task"]


def collect(paths: list[str | Path]) -> list[dict]:
    """Flat rows from result JSONs (files, or folders searched for ``*.json``), sorted."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    rows = []
    for file in files:
        result = read_json(str(file))
        if not {"model", "dataset", "task", "metrics"} <= result.keys():
            continue  # another JSON in the folder, not an evaluation result
        model = result["model"]
        rows.append({"model": model["spec"], "step": model.get("step"), "dataset": result["dataset"],
                     "task": result["task"], **result["metrics"]})
    return sorted(rows, key=lambda r: (r["model"], r["step"] or -1, r["dataset"], r["task"]))


def _columns(rows: list[dict]) -> list[str]:
    metrics = sorted({k for r in rows for k in r} - set(FIXED))
    return FIXED + metrics


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(r.get(k)) for k in _columns(rows)} for r in rows)
    return out.getvalue()


def to_markdown(rows: list[dict]) -> str:
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], prefix: str | Path) -> list[str]:
    """``PREFIX.csv`` and ``PREFIX.md``."""
    written = []
    for suffix, text in ((".csv", to_csv(rows)), (".md", to_markdown(rows))):
        with atomic_write(f"{prefix}{suffix}", "w") as f:
            f.write(text)
        written.append(f"{prefix}{suffix}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="result JSON files or folders holding them")
    parser.add_argument("--output", default="results", help="output prefix (PREFIX.csv, PREFIX.md)")
    args = parser.parse_args(argv)
    rows = collect(args.paths)
    if not rows:
        raise UserError(f"no evaluation results found in {', '.join(args.paths)} (give result JSON files or folders holding them)")
    print("\n".join(write(rows, args.output)))


if __name__ == "__main__":
    run_command(main)
