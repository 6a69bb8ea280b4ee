"""`make demo` end to end on a shorter schedule (configs/demo/fast.yaml): the goals hold.

Real components throughout: the pool served over HTTP on 127.0.0.1, img2dataset, the
bootstrap scorer, curation, DeepSpeed training on 2 gloo ranks, zero-shot evaluation.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_meets_its_goals(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "pipeline.demo", "--config", "demo/fast.yaml", f"output={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((out / "report" / "summary.json").read_text())
    numbers = summary["numbers"]
    assert numbers["zeroshot"]["acc1"] >= 0.70
    assert numbers["mismatch"]["recall"] >= 0.8 and numbers["mismatch"]["precision"] >= 0.8
    assert numbers["duplicates"]["recall"] >= 0.95 and numbers["duplicates"]["distinct_images_dropped"] == 0
    assert numbers["per_fault"]["eval_copy"]["recall"] == 1.0  # decontamination
    for figure in ("funnel.png", "curation_quality.png"):
        assert (out / "report" / figure).stat().st_size > 0
    assert list((out / "report").glob("*confusion*.png")), "the evaluation's confusion matrix is in the report"
    assert f"Report: {out / 'report' / 'README.md'}" in proc.stdout
