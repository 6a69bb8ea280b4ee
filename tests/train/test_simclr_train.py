"""SimCLR through the real trainer: 2 gloo ranks, DeepSpeed ZeRO-1, Fashion-MNIST shards.

One short run serves two checks: the NT-Xent loss falls, and the linear probe (the
evaluation stage's ``linear_probe`` task) on its frozen ``encode_image`` features beats the
same network at its random initialisation. The shards hold the first 1024 Fashion-MNIST
test images without labels; the probe fits and scores on labelled images of that split.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.core import config
from train.encoder import Encoder, load_encoder
from pipeline.evaluation.datasets import DATASETS, EvalSet
from pipeline.evaluation.features import EvalContext
from pipeline.evaluation.tasks.linear_probe import LinearProbe
from train.config import TrainConfig
from train.registry import MODELS

STEPS = 30


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def simclr_run(torchrun, fmnist_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("simclr") / "run"
    args = ["-m", "train.main", "--config", "configs/simclr/tiny.yaml", f"data.path={fmnist_shards}",
            f"run.run_dir={run_dir}", f"run.steps={STEPS}", "run.log_every=5", "data.workers=1"]
    result = torchrun(args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_simclr_training_on_two_ranks_lowers_the_loss(simclr_run):
    curve = losses(simclr_run)  # mean NT-Xent of each 5-step window
    assert len(curve) == STEPS // 5
    assert curve[-1] < curve[0] - 0.02, curve


def probe_accuracy(encoder: Encoder) -> float:
    dataset = DATASETS.get("fashion_mnist_test").Config(name="fashion_mnist_test", limit=600)
    probe = LinearProbe(LinearProbe.Config(name="linear_probe", max_iter=300))
    return probe.run(EvalContext(encoder=encoder, data=EvalSet(dataset), batch_size=200)).metrics["lp_acc1"]


@pytest.mark.slow
def test_linear_probe_on_pretrained_features_beats_random_init(simclr_run):
    torch.set_num_threads(2)
    pretrained = load_encoder(str(simclr_run))
    cfg = config.load(TrainConfig, simclr_run / "config.yaml")
    torch.manual_seed(cfg.run.seed)  # the trainer's seed: exactly the weights the run started from
    initial = MODELS.build(cfg.model.name, cfg.model).eval()
    at_init = Encoder(model=initial, preprocess=pretrained.preprocess, tokenize=pretrained.tokenize, name="init")
    trained, untrained = probe_accuracy(pretrained), probe_accuracy(at_init)
    assert trained > untrained + 0.1, (trained, untrained)
