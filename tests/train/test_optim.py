"""AdamW's parameter groups (no weight decay on biases, norms, the temperature) and the lr schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from train.config import OptimConfig, ScheduleConfig
from train.optim import build_optimizer, lr_at
from train.registry import MODELS, OBJECTIVES


def clip_tiny():
    torch.manual_seed(0)
    builder = MODELS.get("clip_tiny")
    return OBJECTIVES.build("clip", OBJECTIVES.get("clip").Config(), builder(builder.Config()))


def decayed_by_one_step(module: nn.Module, exempt=()) -> dict[str, bool]:
    """Name -> whether one AdamW step with zero gradients (weight decay alone) moved the parameter."""
    lr, wd = 0.1, 0.5
    optimizer = build_optimizer(module, OptimConfig(name="adamw", lr=lr, weight_decay=wd), torch.device("cpu"), exempt)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = {}
    for name, p in module.named_parameters():
        moved[name] = not torch.equal(p.detach(), before[name])
        if moved[name]:  # decoupled decay: p <- p (1 - lr wd)
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd))
    return moved


def test_adamw_decays_matrices_only_not_biases_norms_or_the_temperature():
    objective = clip_tiny()
    moved = decayed_by_one_step(objective, objective.no_weight_decay())
    params = dict(objective.named_parameters())
    biases_and_norms = [n for n, p in params.items() if p.ndim < 2]
    assert "logit_scale" in params and any(".norm" in n or "ln_" in n for n in biases_and_norms)
    assert any(n.endswith(".bias") for n in biases_and_norms)
    for name, p in params.items():
        assert moved[name] == (p.ndim >= 2 and name != "logit_scale"), name


def test_no_weight_decay_exempts_named_parameters_whatever_their_shape():
    module = nn.Module()
    module.table, module.kernel = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3, 3))
    assert decayed_by_one_step(module, {"table"}) == {"table": False, "kernel": True}


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg, base, total = ScheduleConfig(warmup_steps=4, min_lr_ratio=0.1), 2.0, 24
    lrs = [lr_at(step, total, base, cfg) for step in range(total + 1)]
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # (step + 1) / warmup: the first step already learns
    assert lrs[4] == pytest.approx(base)  # cosine starts at the base rate
    middle = 4 + (total - 4) // 2
    assert lrs[middle] == pytest.approx(base * (0.1 + 0.9 * 0.5))
    assert lrs[total] == pytest.approx(base * 0.1) and lr_at(total + 10, total, base, cfg) == pytest.approx(0.2)
    for step in range(5, total + 1):  # every cosine value, not only three points
        progress = (step - 4) / (total - 4)
        assert lrs[step] == pytest.approx(base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
