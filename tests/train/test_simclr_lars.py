"""LARS: the layer-wise trust ratio by hand, the 1-D exemption, the refusal of flat partitions, and its
run without ZeRO (stage 0) through the real DeepSpeed engine on 2 gloo ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from pipeline.core import config
from train.config import OptimConfig, ParallelConfig, RunConfig
from train.parallel import deepspeed_config
from train.lars import LARS
from train.optim import build_optimizer


def test_lars_steps_match_the_formula():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    lr, momentum, wd, eta = 0.5, 0.9, 0.1, 0.01
    optimizer = LARS([weight, bias], lr=lr, momentum=momentum, weight_decay=wd, eta=eta)
    grad = torch.tensor([[0.0, 1.0]])
    velocity_w, velocity_b = torch.zeros(1, 2), torch.zeros(1)
    w, b = weight.detach().clone(), bias.detach().clone()
    for _ in range(2):
        weight.grad, bias.grad = grad.clone(), torch.tensor([2.0])
        optimizer.step()
        update = grad + wd * w  # weights: decay, then the trust ratio eta * ||w|| / ||update||
        velocity_w = momentum * velocity_w + lr * eta * w.norm() / update.norm() * update
        velocity_b = momentum * velocity_b + lr * torch.tensor([2.0])  # biases: neither
        w, b = w - velocity_w, b - velocity_b
        torch.testing.assert_close(weight.detach(), w)
        torch.testing.assert_close(bias.detach(), b)


def test_lars_refuses_parameters_it_was_not_built_with():
    weight = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = LARS([weight], lr=0.1)
    flat = torch.nn.Parameter(torch.ones(4))  # what ZeRO puts into the param groups
    flat.grad = torch.ones(4)
    optimizer.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="whole parameters"):
        optimizer.step()


def test_lars_is_an_optimizer_option():
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, OptimConfig(name="lars", lr=0.1, weight_decay=1e-6), torch.device("cpu"))
    assert isinstance(optimizer, LARS)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 1e-6]


@pytest.mark.slow
def test_lars_trains_through_deepspeed_without_zero_on_two_ranks(torchrun, tmp_path):
    """ZeRO stage 0 (configs/deepspeed/zero0.yaml): each step is LARS's formula on the gradient averaged
    over the ranks, far from plain momentum SGD's; fp32 and bf16 autocast; the checkpoint's weights are
    whole and load, with LARS's momentum, on another world size without conversion."""
    proc = torchrun(["tests/train/dist_lars.py", str(tmp_path), "train"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for dtype in ("fp32", "bf16"):
        run = json.loads((tmp_path / f"lars_{dtype}.json").read_text())
        assert max(run["lars_gap"]) < 1e-4, run["lars_gap"]  # the trust ratio is applied, per layer
        assert min(run["sgd_gap"]) > 0.5, run["sgd_gap"]  # and it matters: plain SGD would step elsewhere
        assert run["grad_gap"] < (1e-6 if dtype == "fp32" else 2e-2)  # rank-averaged = full-batch gradient
        assert run["loss"][-1] < 0.5 * run["loss"][0], run["loss"]
        assert run["weights_match"]
    resumed = subprocess.run([sys.executable, "tests/train/dist_lars.py", str(tmp_path), "resume"], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "resume.json").read_text()) == {"weights": True, "velocity": True,
                                                                  "partitioned": False}


def test_zero_stage_0_is_plain_data_parallel_in_the_deepspeed_config():
    cfg = config.load(ParallelConfig, "deepspeed/zero0.yaml")
    ds = deepspeed_config(cfg, RunConfig(run_dir="r", steps=1), 4, 2)
    assert ds["zero_optimization"]["stage"] == 0 and ds["train_batch_size"] == 8
