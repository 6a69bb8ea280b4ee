"""Collectives used inside objectives (CLIP, ALBEF, SimCLR, MoCo).

All of them work unchanged in a single process (they return the input), so the same
objective runs in unit tests and on N nodes x 8 GPUs.

Every collective here is a blocking c10d call. torch's functional collectives
(``_functional_collectives.all_gather_single_autograd``) are not used on purpose: on gloo,
their asynchronous backward corrupted a rank's heap in two of three 25,000-step stress runs,
once after about 7,000 steps (a SIGSEGV or ``malloc(): unaligned tcache chunk`` in gloo's
worker thread; ``python -m benchmarks.gather_stress``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty((world()[1] * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


# Backends whose backward reduce-scatters (each rank receives only its own slice, summed: half
# the bytes of an all-reduce of the whole gathered gradient). Gloo keeps the blocking all-reduce,
# the path its stress runs validated (module docstring).
REDUCE_SCATTER_BACKENDS = {"nccl"}


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: every rank's gradient for the whole gathered
    tensor, summed over ranks, this rank's slice of it (reduce-scatter on NCCL, all-reduce then
    narrow on gloo)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch = world()[0], x.shape[0]
        return _gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if dist.get_backend() in REDUCE_SCATTER_BACKENDS:
            out = grad.new_empty((ctx.batch, *grad.shape[1:]))
            dist.reduce_scatter_single(out, grad.contiguous())
            return out
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place; autograd owns grad
        dist.all_reduce(grad)
        return grad.narrow(0, ctx.rank * ctx.batch, ctx.batch)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) per rank -> (world * b, ...) in rank order.

    Autograd-aware: backward sums the gradient that every rank computed for a slice into the
    rank that owns it, so a loss over gathered features trains every rank's encoder.
    """
    _, world_size = world()
    if world_size == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) per rank -> (world * b, ...) in rank order, without gradient (queue keys, ids)."""
    _, world_size = world()
    if world_size == 1:
        return x
    return _gather(x)
