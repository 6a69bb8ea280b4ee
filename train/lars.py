"""LARS (You et al. 2017) as SimCLR trains with it: SGD with momentum and a layer-wise trust ratio.

For every weight matrix or kernel the update ``g + wd * w`` is scaled by
``eta * ||w|| / ||g + wd * w||``, so each layer moves by a fixed fraction of its own norm
whatever the batch size; biases and normalisation parameters (1-D) get neither weight
decay nor the ratio, as in SimCLR's implementation.

The ratio needs each parameter whole. DeepSpeed's ZeRO (and its bf16 optimizer) hand the
optimizer flat partitions instead, where per-layer norms are meaningless, so ``step``
refuses parameters it was not built with rather than silently training something else.
"""

from __future__ import annotations

from typing import Iterable

import torch


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
    ):
        if lr < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS settings lr={lr} momentum={momentum} weight_decay={weight_decay} eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov)
        super().__init__(params, defaults)
        self._whole = {id(p) for group in self.param_groups for p in group["params"]}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if id(p) not in self._whole:
                    raise RuntimeError(
                        "LARS got a parameter it was not built with (a flat ZeRO or bf16-optimizer "
                        "partition?); its layer-wise trust ratio needs whole parameters: run it with "
                        "DeepSpeed ZeRO disabled (stage 0) and fp32 master weights"
                    )
                p.add_(self._update(p, group, self.state[p]), alpha=-1.0)
        return loss

    @staticmethod
    def _update(p: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        update = p.grad
        lr = group["lr"]
        if p.ndim > 1:  # weights: decay and trust ratio; biases and norms: plain momentum SGD
            update = update.add(p, alpha=group["weight_decay"])
            w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
            trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, 1.0)
            update = update * trust
        velocity = state.setdefault("momentum", torch.zeros_like(p))
        velocity.mul_(group["momentum"]).add_(update, alpha=lr)  # lr inside the velocity, as SimCLR does
        return velocity * group["momentum"] + update * lr if group["nesterov"] else velocity

