"""LARS: the layer-wise trust ratio by hand, the 1-D exemption, the refusal of flat partitions."""

from __future__ import annotations

import pytest
import torch

from train.config import OptimConfig
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
