"""MoCo v2 through the real trainer: 2 gloo ranks, DeepSpeed ZeRO-1, shuffle-BN, Fashion-MNIST shards."""

from __future__ import annotations

import json

import pytest

STEPS = 20


@pytest.mark.slow
def test_moco_training_on_two_ranks_lowers_the_loss(torchrun, fmnist_shards, tmp_path):
    # The queue holds exactly one global batch (2 x 32), so from step 2 on every negative is a
    # real key; step 1 scores against the random initial queue and is left out. A fast key
    # encoder (momentum 0.9) lets 20 steps show learning.
    args = ["-m", "train.main", "--config", "configs/moco/tiny.yaml", f"data.path={fmnist_shards}",
            f"run.run_dir={tmp_path / 'run'}", f"run.steps={STEPS}", "run.log_every=1", "data.workers=1",
            "objective.queue_size=64", "objective.momentum=0.9",
            "run.channels_last=true"]  # NHWC images through real DeepSpeed (the model keeps its layout)
    result = torchrun(args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    early, late = rows[1:5], rows[STEPS // 2 :]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean(late, "loss") < mean(early, "loss") - 0.05, [round(r["loss"], 3) for r in rows]
    assert mean(late, "accuracy") > mean(early, "accuracy") + 0.05  # the positive among 65 keys, chance 1/65
