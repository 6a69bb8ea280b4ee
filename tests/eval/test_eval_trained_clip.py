"""Integration: a tiny CLIP trained briefly on captioned Fashion-MNIST beats chance zero-shot.

The trainer writes a run directory (``torchrun -m train.main``); ``python -m
pipeline.evaluate`` loads it through the ``checkpoint`` loader and classifies *other* test
images (the ones after the trained ones) from the class names alone.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINED = 1024  # the trainer's shard writer uses the first N test images


def _trainer_fixtures():
    """The trainer tests' helpers (shard writer, torchrun command), shared rather than rewritten."""
    spec = importlib.util.spec_from_file_location("train_test_fixtures", ROOT / "tests" / "train" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_briefly_trained_clip_beats_chance_zero_shot(tmp_path):
    fixtures = _trainer_fixtures()
    data = fixtures.write_fmnist_shards(tmp_path / "data", count=TRAINED, shards=4)
    run_dir = tmp_path / "run"
    cmd, env = fixtures.torchrun_command(
        ["-m", "train.main", "--config", "configs/clip/tiny.yaml", f"data.path={data}", f"run.run_dir={run_dir}",
         "run.steps=40", "run.ckpt_every=40", "run.log_every=10", "data.batch_size=64", "data.workers=0"], nproc=1)
    trained = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-4000:]

    evaluated = subprocess.run(
        [sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(run_dir), "--config", "eval/fashion_mnist.yaml",
         f"dataset.start={TRAINED}", "dataset.limit=1000", "tasks=[{name: zeroshot_classification}]"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    [result] = json.loads(evaluated.stdout)
    assert result["model"]["step"] == 40
    assert result["metrics"]["acc1"] > 0.2, result  # 10 classes: chance is 0.1

    out = run_dir / "eval"  # a run directory's results go next to it
    stem = "run__fashion_mnist_test__zeroshot_classification"  # named after the run directory
    assert json.loads((out / f"{stem}.json").read_text())["metrics"] == result["metrics"]
    for name in (f"{stem}_confusion.png", "training_curves.png", "results.csv", "results.md"):
        assert (out / name).is_file(), name
