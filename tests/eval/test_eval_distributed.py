"""Two gloo ranks split the embedding work and produce the numbers of one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eval_models import projection_encoder
from pipeline import config
from pipeline.evaluation import EvalConfig, run

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, model: str, args: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{HERE}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(HERE / "dist_eval.py"), model, *args, f"output={tmp_path / 'two'}", "--log-level", "WARNING"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(line["rank"] for line in lines) == [0, 1]
    return lines


def _assert_same(one: list[dict], two: list[dict]) -> None:
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, abs=1e-6, nan_ok=True)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_classification_and_linear_probe(tmp_path):
    # 101 images: the ranks get uneven slices (51 and 50)
    args = ["--config", "eval/fashion_mnist.yaml", "dataset.limit=101", "batch_size=16", "plots=false"]
    cfg = config.load(EvalConfig, "eval/fashion_mnist.yaml", args[2:] + [f"output={tmp_path / 'one'}"])
    one = [r["metrics"] for r in run(cfg, projection_encoder())]
    for line in _torchrun(tmp_path, "projection", args):
        _assert_same(one, line["metrics"])
    assert one[0]["acc1"] > 0 and one[1]["lp_acc1"] > 0


@pytest.mark.slow
def test_two_ranks_equal_one_rank_retrieval_with_itm_rerank(tmp_path, colour_shards):
    args = ["--config", "eval/retrieval.yaml", f"dataset.urls={colour_shards}", "batch_size=2",
            "tasks=[{name: retrieval, rerank_k: 4, rerank_score: itm}]"]
    cfg = config.load(EvalConfig, "eval/retrieval.yaml", args[2:] + [f"output={tmp_path / 'one'}"])
    one = [r["metrics"] for r in run(cfg, projection_encoder(itm="reversed"))]
    assert one[0]["reranked_top_k"] == 4
    for line in _torchrun(tmp_path, "projection_itm", args):
        _assert_same(one, line["metrics"])
