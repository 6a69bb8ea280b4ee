"""``python -m benchmarks.gpu_step`` in its CPU tiny mode prints both systems side by side, with
FLOPs, memory, the loader's supply and ALBEF (the figures themselves say nothing about GPUs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_step_benchmark_prints_both_systems_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_step", "--device", "cpu", "--tiny",
                           "--loader-workers", "1", "--loader-samples", "128", "--peak-tflops", "0.5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["benchmark"] == "gpu_step" and result["mode"] == "tiny" and result["device"] == "cpu"
    row = result["clip"]["tiny"]
    for side in ("ours", "open_clip"):
        assert row[side]["samples_per_s"] > 0 and row[side]["peak_mem_gib"] >= 0
        assert row[side]["flops_per_step"] > 0
        assert row[side]["mfu"] == row[side]["flops_per_step"] / row[side]["step_s"] / 0.5e12
    # Same architecture on both sides: the counted FLOPs must agree.
    assert abs(row["ours"]["flops_per_step"] / row["open_clip"]["flops_per_step"] - 1) < 0.05
    assert row["ratio_ours_vs_open_clip"] == row["ours"]["samples_per_s"] / row["open_clip"]["samples_per_s"]
    assert result["albef"]["samples_per_s"] > 0 and result["albef"]["flops_per_step"] > 0
    assert result["loader"]["samples_per_s"] > 0 and result["loader"]["workers"] == 1
    assert result["loader_vs_step"]["tiny"]["limited_by"] in ("loader", "step")
    assert "FlopCounterMode" in result["flop_count"] and result["peak_flops_source"] == "--peak-tflops"
