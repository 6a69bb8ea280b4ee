"""The optimizer by name (``optim.name``: adamw, sgd, lars) over two parameter groups, and the
learning rate as a pure function of the step.

Weight decay applies to matrices and convolution kernels only: biases, norms, embeddings'
scalars and the temperature (ndim < 2) and whatever the objective lists in
``no_weight_decay()`` are exempt. Frozen parameters (momentum encoders) get no group.
"""

from __future__ import annotations

import math
from typing import Collection

import torch
from torch import nn

from pipeline.core.registry import Registry
from train.config import OptimConfig, ScheduleConfig
from train.lars import LARS


def param_groups(module: nn.Module, weight_decay: float, exempt: Collection[str] = ()) -> list[dict]:
    """``[decay, no_decay]`` groups; each trainable parameter lands in exactly one of them.
    ``exempt`` names parameters that get no weight decay whatever their shape."""
    exempt = set(exempt)
    unknown = exempt - {name for name, _ in module.named_parameters()}
    if unknown:
        raise ValueError(f"no_weight_decay() names parameters that do not exist: {sorted(unknown)}")
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in exempt else decay).append(p)
    if not decay and not no_decay:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return [g for g in groups if g["params"]]


OPTIMIZERS: Registry = Registry("optimizer")  # name -> (param groups, OptimConfig, device) -> optimizer


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda")


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)  # MoCo's recipe


@OPTIMIZERS.register("lars")
def lars(groups: list[dict], cfg: OptimConfig, device: torch.device) -> LARS:
    return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.trust_coefficient)


def build_optimizer(module: nn.Module, cfg: OptimConfig, device: torch.device,
                    exempt: Collection[str] = ()) -> torch.optim.Optimizer:
    return OPTIMIZERS.build(cfg.name, param_groups(module, cfg.weight_decay, exempt), cfg, device)


def lr_at(step: int, total_steps: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``base_lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
