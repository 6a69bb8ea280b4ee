"""Feature queues (ALBEF's ITC queues, MoCo's key queue), identical on every rank.

Each step, every rank enqueues the keys gathered from all ranks in rank order, so all
ranks hold the same queue without any extra synchronisation.
"""

from __future__ import annotations

import torch
from torch import nn

from train.gather import all_gather_no_grad


class FeatureQueue(nn.Module):
    """Ring buffers ``queue_<name>`` of shape (size, dim), or (size,) for ids, plus a pointer."""

    def __init__(self, size: int, seed: int = 0, **dims: int | None):
        super().__init__()
        self.size = size
        generator = torch.Generator().manual_seed(seed)  # same initial contents on every rank
        for name, dim in dims.items():
            if dim is None:  # integer ids; -1 never matches a real sample id
                self.register_buffer(f"queue_{name}", torch.full((size,), -1, dtype=torch.long))
            else:
                init = torch.randn(size, dim, generator=generator)
                self.register_buffer(f"queue_{name}", nn.functional.normalize(init, dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.names = list(dims)

    def check(self, global_batch: int) -> None:
        """Raise before training when a step's keys would not tile the ring exactly."""
        if self.size % global_batch:
            raise ValueError(
                f"queue size {self.size} is not a multiple of the global batch {global_batch} "
                f"(micro batch x world size); choose e.g. {global_batch * max(1, self.size // global_batch)}"
            )

    def get(self, name: str) -> torch.Tensor:
        return getattr(self, f"queue_{name}")

    @torch.no_grad()
    def enqueue(self, **local: torch.Tensor) -> None:
        """Append this step's keys of every rank (pass each queue's local keys by name)."""
        if set(local) != set(self.names):
            raise ValueError(f"enqueue needs exactly {self.names}, got {sorted(local)}")
        # The pointer stays a device tensor: reading it (int(ptr)) would make the host wait for
        # the GPU at every enqueue. Every rank enqueues the same gathered keys, so it stays equal.
        for name, keys in local.items():
            keys = all_gather_no_grad(keys.detach())
            n = keys.shape[0]
            index = (torch.arange(n, device=self.ptr.device) + self.ptr) % self.size
            self.get(name).index_copy_(0, index, keys.to(self.get(name).dtype))
        self.ptr.add_(n).remainder_(self.size)
