"""`make demo` end to end (configs/demo.yaml, its output in a temporary folder), and its goals.

Real components throughout: the pool served over HTTP on 127.0.0.1, img2dataset, the
bootstrap scorer, curation, DeepSpeed training on 2 gloo ranks, zero-shot evaluation.
The demo runs once per module; each goal is its own test.
"""

import json
import subprocess
import sys
from pathlib import Path

from pipeline import demo as demo_module

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the demo run is its first test's setup


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = subprocess.run([sys.executable, "-m", "pipeline.demo", "--config", "demo.yaml", f"output={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    summary_path = out / "report" / "summary.json"
    assert summary_path.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads(summary_path.read_text())
    goals_met = all(met for *_, met in summary["goals"])
    assert proc.returncode == (0 if goals_met else 1), proc.stderr[-6000:]  # the exit status says whether goals were met
    return out, proc.stdout, summary["numbers"]


def test_demo_writes_its_report(demo):
    out, stdout, _ = demo
    for figure in ("funnel.png", "curation_quality.png"):
        assert (out / "report" / figure).stat().st_size > 0
    assert list((out / "report").glob("*confusion*.png")), "the evaluation's confusion matrix is in the report"
    assert f"Report: {out / 'report' / 'README.md'}" in stdout


def test_zero_shot_goal(demo):
    assert demo[2]["zeroshot"]["acc1"] >= 0.70


def test_no_distinct_image_dropped_and_eval_copies_removed(demo):
    numbers = demo[2]
    assert numbers["duplicates"]["distinct_images_dropped"] == 0
    assert numbers["per_fault"]["eval_copy"]["recall"] == 1.0  # the demo curates the whole pool: README 1.000 over 40 eval copies


def test_mismatch_goal(demo):
    mismatch = demo[2]["mismatch"]
    assert mismatch["recall"] >= 0.8 and mismatch["precision"] >= 0.8


def test_duplicate_recall_goal(demo):
    assert demo[2]["duplicates"]["recall"] >= 0.95


def test_a_rerun_skips_every_finished_stage(demo):
    """The second `python -m pipeline.demo` runs no stage again (each has its done/ marker) and rewrites the same numbers."""
    out, _, numbers = demo
    outputs = [out / "pool" / "manifest.parquet", out / "runs" / "clip" / "metrics.jsonl", out / "seed" / "manifest.parquet"]
    before = {p: p.stat().st_mtime_ns for p in outputs}
    proc = subprocess.run([sys.executable, "-m", "pipeline.demo", "--config", "demo.yaml", f"output={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    for stage in demo_module.STAGES:
        assert f"{stage.name}: done earlier" in proc.stderr, proc.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
    assert json.loads((out / "report" / "summary.json").read_text())["numbers"] == numbers


def test_a_stage_with_its_done_marker_is_not_run(tmp_path):
    """The skip rule itself, without the demo: a marker skips the command; without one it runs (here: a command that fails)."""
    import pytest

    from pipeline.core import config
    from pipeline.core.io import write_json

    cfg = config.load(demo_module.DemoConfig, config.CONFIG_ROOT / "demo.yaml", [f"output={tmp_path}"])
    paths = demo_module.layout(tmp_path)
    failing = demo_module.Stage("evaluate", "pipeline.no_such_command", lambda p: [])
    write_json(str(paths["done"] / "evaluate.json"), {"seconds": 12.5, "command": []})
    assert demo_module.run_stage(failing, cfg, paths) == 12.5
    (paths["done"] / "evaluate.json").unlink()
    with pytest.raises(subprocess.CalledProcessError):
        demo_module.run_stage(failing, cfg, paths)
    assert not (paths["done"] / "evaluate.json").exists()  # a failed stage leaves no marker: the next run retries it
