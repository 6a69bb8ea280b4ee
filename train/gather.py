"""Collectives used inside objectives (CLIP, ALBEF, SimCLR, MoCo).

All of them work unchanged in a single process (they return the input), so the same
objective runs in unit tests and on N nodes x 8 GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) per rank -> (world * b, ...) in rank order.

    Autograd-aware: backward sums the gradient that every rank computed for a slice into the
    rank that owns it, so a loss over gathered features trains every rank's encoder.
    """
    _, world_size = world()
    if world_size == 1:
        return x
    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return gather(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) per rank -> (world * b, ...) in rank order, without gradient (queue keys, ids)."""
    _, world_size = world()
    if world_size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)
