"""The demo's report folder: a markdown summary, PNG plots, and the goals checked.

``write_report(paths, goals, timings)`` reads what the stages left behind (the curation
manifest and stats, the training run's metrics, the evaluation's JSON and plots), scores the
curation against the embedded pool's planted ground truth, and writes ``report/``:

- ``README.md``: stage timings, the curation funnel, curation quality, zero-shot results, goals;
- ``funnel.png``: samples kept after each step and the counts per drop reason;
- ``curation_quality.png``: recall per planted fault class;
- the evaluation's plots (confusion matrix, loss and temperature curves), copied;
- ``summary.json``: every number above.

Curation quality joins the manifest (``dropped_by``, ``reason`` per input row) to the pool on
the ``id`` column the URL list carries.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.core.io import read_json, write_json  # noqa: E402
from pipeline.core.log import get_logger  # noqa: E402

log = get_logger(__name__)
# The order rows meet the steps in (build_shards: prepare, download, then the configured steps).
STEP_ORDER = ("prepare", "download", "basic", "decontaminate", "clip_score", "dedupe")


def _reached(step: pd.Series, target: str) -> pd.Series:
    """Rows not dropped by any step before ``target``."""
    return ~step.isin(STEP_ORDER[: STEP_ORDER.index(target)])


# ---------------------------------------------------------------------------- curation quality


def _precision_recall(removed: pd.Series, positive: pd.Series) -> dict[str, float]:
    hits = int((removed & positive).sum())
    return {"recall": hits / max(int(positive.sum()), 1), "precision": hits / max(int(removed.sum()), 1),
            "removed": int(removed.sum()), "planted": int(positive.sum())}


def duplicate_quality(rows: pd.DataFrame) -> dict[str, float]:
    """Dedupe against the planted duplicate groups (an original plus its exact and near copies).

    Of each group that reached dedupe, exactly one member should survive: recall counts the
    removed copies against ``size - 1`` per group; ``distinct_images_dropped`` counts groups
    (singletons included) left with no member, i.e. images lost from the dataset.
    """
    reached = rows[rows["reached_dedupe"] & (rows["fault"] != "eval_copy")]  # decontamination is scored apart
    group = reached["dup_of"].where(reached["dup_of"] >= 0, reached["id"])
    groups = pd.DataFrame({"group": group, "removed": reached["removed_by_dedupe"]}).groupby("group")["removed"]
    size, removed = groups.size(), groups.sum()
    expected = (size - 1).clip(lower=0)
    return {
        "recall": float(np.minimum(removed, expected).sum() / max(expected.sum(), 1)),
        "precision": float(np.minimum(removed, expected).sum() / max(removed.sum(), 1)),
        "removed": int(removed.sum()),
        "planted": int(expected.sum()),
        "distinct_images_dropped": int((removed >= size).sum()),
    }


def curation_quality(manifest: pd.DataFrame, pool: pd.DataFrame) -> dict:
    """Recall/precision of the removals each planted fault class calls for."""
    rows = pool.merge(manifest[["id", "step", "reason"]], on="id", how="left", validate="one_to_one")
    rows["step"] = rows["step"].fillna("")
    rows["removed"] = rows["step"] != ""
    rows["removed_by_dedupe"] = rows["step"] == "dedupe"
    rows["reached_dedupe"] = _reached(rows["step"], "dedupe")
    clip_reached = _reached(rows["step"], "clip_score")
    mismatch = _precision_recall((rows["step"] == "clip_score")[clip_reached], (rows["fault"] == "mismatch")[clip_reached])
    per_fault = {}
    for fault, part in rows.groupby(rows["fault"].replace("", "clean")):
        reasons = part.loc[part["removed"], "reason"].value_counts()
        per_fault[fault] = {"planted": len(part), "removed": int(part["removed"].sum()),
                            "recall": float(part["removed"].mean()), "reasons": reasons.to_dict()}
    return {"mismatch": mismatch, "duplicates": duplicate_quality(rows), "per_fault": per_fault}


def load_manifest(build_dir: Path) -> pd.DataFrame:
    """``id, step, reason`` per input row (``step`` is "" for kept rows) from build_shards' manifest."""
    manifest = pd.read_parquet(build_dir / "manifest.parquet", columns=["id", "dropped_by", "reason"])
    return manifest.rename(columns={"dropped_by": "step"})


# ---------------------------------------------------------------------------- plots


def plot_funnel(stats: dict, path: Path) -> None:
    """Samples left after each step, and what each step dropped by reason (build_shards' stats.json)."""
    steps = [s for s in STEP_ORDER if s in stats["dropped"]]
    left_after = np.cumsum([stats["input_rows"]] + [-sum(stats["dropped"][s].values()) for s in steps])
    reasons = [(f"{s}: {r}", n) for s in steps for r, n in stats["dropped"][s].items() if n]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.35 * max(len(reasons), 8) + 1.5))
    left.bar(["input", *steps], left_after, color="tab:blue")
    left.set_ylabel("samples")
    left.set_title("curation funnel")
    left.tick_params(axis="x", labelrotation=30)
    for x, value in enumerate(left_after):
        left.annotate(str(value), (x, value), ha="center", va="bottom", fontsize=8)
    right.barh([r for r, _ in reasons][::-1], [n for _, n in reasons][::-1], color="tab:red")
    right.set_xscale("log")
    right.set_title("dropped, per step and reason")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fault_recall(per_fault: dict, path: Path) -> None:
    faults = sorted(per_fault)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(faults) + 1.2))
    ax.barh(faults, [per_fault[f]["recall"] for f in faults], color=["tab:gray" if f == "clean" else "tab:green" for f in faults])
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction removed (clean: false removals)")
    ax.set_title("curation against the planted faults")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- the report


def _zeroshot(eval_dir: Path) -> dict | None:
    """The zero-shot classification result the evaluation wrote (one JSON per dataset and task)."""
    for path in sorted(eval_dir.rglob("*.json")) if eval_dir.exists() else ():
        result = read_json(str(path))
        if isinstance(result, dict) and result.get("task") == "zeroshot_classification":
            return result["metrics"]
    return None


def check_goals(goals, numbers: dict) -> list[tuple[str, str, str, bool | None]]:
    """(goal, target, measured, met) rows; met is None where the number does not exist yet."""

    def row(name, target, value, ok):
        measured = "not measured" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        return (name, target, measured, None if value is None else ok(value))

    mm, dup, zs = numbers.get("mismatch"), numbers.get("duplicates"), numbers.get("zeroshot")
    get = lambda d, k: None if d is None else d[k]  # noqa: E731
    return [
        row("zero-shot top-1 (Fashion-MNIST test)", f">= {goals.zeroshot_top1}", get(zs, "acc1"), lambda v: v >= goals.zeroshot_top1),
        row("mismatched captions removed: recall", f">= {goals.mismatch_recall}", get(mm, "recall"), lambda v: v >= goals.mismatch_recall),
        row("mismatched captions removed: precision", f">= {goals.mismatch_precision}", get(mm, "precision"), lambda v: v >= goals.mismatch_precision),
        row("duplicates removed: recall", f">= {goals.duplicate_recall}", get(dup, "recall"), lambda v: v >= goals.duplicate_recall),
        row("distinct images dropped by dedupe", f"<= {goals.distinct_images_dropped}", get(dup, "distinct_images_dropped"),
            lambda v: v <= goals.distinct_images_dropped),
    ]


def _markdown(timings: dict, numbers: dict, goal_rows: list, figures: list[str]) -> str:
    lines = ["# Demo report", "", "## Goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {g} | {t} | {m} | {'-' if ok is None else 'yes' if ok else 'NO'} |" for g, t, m, ok in goal_rows]
    lines += ["", "## Stages", "", "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {name} | {s:.0f} |" for name, s in timings.items()]
    if "stats" in numbers:
        dropped = numbers["stats"]["dropped"]
        lines += ["", "## Curation funnel", "", f"{numbers['stats']['input_rows']} input rows, "
                  f"{numbers['stats']['kept']} kept in {numbers['stats']['shards']} shards.", "",
                  "| step | reason | dropped |", "|---|---|---|"]
        lines += [f"| {s} | {r} | {n} |" for s in STEP_ORDER if s in dropped for r, n in dropped[s].items()]
    if "per_fault" in numbers:
        lines += ["", "## Curation against the planted faults", "",
                  "| planted fault | rows | removed | fraction | removed by (step: reason) |", "|---|---|---|---|---|"]
        for fault, q in sorted(numbers["per_fault"].items()):
            reasons = ", ".join(f"{r}: {n}" for r, n in q["reasons"].items())
            lines.append(f"| {fault} | {q['planted']} | {q['removed']} | {q['recall']:.3f} | {reasons} |")
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_report(paths: dict[str, Path], goals, timings: dict[str, float]) -> dict:
    """Write ``paths["report"]``; return the numbers, the goal rows and the printable text."""
    out = paths["report"]
    out.mkdir(parents=True, exist_ok=True)
    numbers, figures = {}, []
    if (paths["pool"] / "manifest.parquet").exists():
        manifest = load_manifest(paths["pool"])
        numbers.update(curation_quality(manifest, pd.read_parquet(paths["truth"])))
        plot_fault_recall(numbers["per_fault"], out / "curation_quality.png")
        figures.append("curation_quality.png")
    if (paths["pool"] / "stats.json").exists():
        numbers["stats"] = read_json(str(paths["pool"] / "stats.json"))
        plot_funnel(numbers["stats"], out / "funnel.png")
        figures.insert(0, "funnel.png")
    numbers["zeroshot"] = _zeroshot(paths["eval"])
    for png in sorted(paths["eval"].rglob("*.png")) if paths["eval"].exists() else ():
        shutil.copy(png, out / png.name)
        figures.append(png.name)
    goal_rows = check_goals(goals, numbers)
    goals_met = all(ok for *_, ok in goal_rows)
    (out / "README.md").write_text(_markdown(timings, numbers, goal_rows, figures))
    write_json(str(out / "summary.json"), {"numbers": numbers, "timings": timings, "goals": goal_rows})
    table = "\n".join(f"  {'ok ' if ok else '-- ' if ok is None else 'NO '} {g}: {m} (goal {t})" for g, t, m, ok in goal_rows)
    text = f"Demo goals:\n{table}\nReport: {out / 'README.md'}"
    return {"numbers": numbers, "goals": goal_rows, "goals_met": goals_met, "text": text}
