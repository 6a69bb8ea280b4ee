"""Two gloo ranks split the embedding work and produce the numbers of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_models import projection_encoder
from pipeline.core import config
from pipeline.evaluation import EvalConfig, run
from train.parallel import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _two_ranks(tmp_path: Path, jobs: list[dict]) -> list[dict]:
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{HERE}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "dist_eval.py"), str(tmp_path / "jobs.json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(line["rank"] for line in lines) == [0, 1]
    return lines


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path, colour_shards):
    """Classification + linear probe on 101 Fashion-MNIST images (uneven slices: 51 and 50), and
    retrieval with ITM reranking (rows of the rerank split across ranks) on WebDataset shards."""
    runs = {
        "projection": ["--config", "eval/fashion_mnist.yaml", "dataset.limit=101", "batch_size=16", "plots=false"],
        "projection_itm": ["--config", "eval/retrieval.yaml", f"dataset.urls={colour_shards}", "batch_size=2",
                           "tasks=[{name: retrieval, rerank_k: 4, rerank_score: itm}]"],
    }
    one = []
    for model, args in runs.items():
        cfg = config.load(EvalConfig, args[1], args[2:] + [f"output={tmp_path / 'one'}"])
        one.append([r["metrics"] for r in run(cfg, projection_encoder(itm="reversed" if "itm" in model else None))])
    assert one[1][0]["reranked_top_k"] == 4
    jobs = [{"model": model, "args": args + [f"output={tmp_path / 'two'}", "--log-level", "WARNING"]}
            for model, args in runs.items()]
    for line in _two_ranks(tmp_path, jobs):
        for one_job, two_job in zip(one, line["metrics"], strict=True):
            for a, b in zip(one_job, two_job, strict=True):
                assert a == pytest.approx(b, abs=1e-6, nan_ok=True)
