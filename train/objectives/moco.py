"""MoCo v2 (He et al. 2020; Chen et al. 2020): queries against a momentum key encoder's queue.

The key encoder is a :class:`train.momentum.Momentum` copy of the model and the queue a
:class:`train.queue.FeatureQueue` filled with the keys of all ranks: the same components as
ALBEF's momentum distillation and ITC queues.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import ConfigError
from train.gather import all_gather_no_grad, world
from train.momentum import Momentum
from train.objective import Objective
from train.precision import full_precision
from train.queue import FeatureQueue
from train.registry import OBJECTIVES


@torch.no_grad()
def shuffled_forward(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``encoder(images)`` with BatchNorm statistics from a random slice of the global batch.

    MoCo's shuffle-BN: each rank encodes a random b of the N gathered images, then the keys
    are put back in order, so a query and its key never share batch statistics (otherwise the
    model can find its positive through them instead of learning features).
    """
    rank, world_size = world()
    if world_size == 1:  # nothing to shuffle across; BatchNorm sees the same batch either way
        return encoder(images)
    b = images.shape[0]
    everything = all_gather_no_grad(images)  # (N, 3, H, W)
    n = everything.shape[0]
    order = key_order(n, b).to(images.device) if rank == 0 else torch.empty(n, dtype=torch.long, device=images.device)
    dist.broadcast(order, src=0)  # one permutation for all ranks
    keys = all_gather_no_grad(encoder(everything[order[rank * b : (rank + 1) * b]]))  # (N, d), shuffled
    unshuffled = torch.empty_like(keys)
    unshuffled[order] = keys
    return unshuffled[rank * b : (rank + 1) * b]  # (b, d)


def key_order(n: int, b: int) -> torch.Tensor:
    """A random order of the N gathered samples in which no slice of b is one rank's own batch.

    A slice holding exactly rank r's samples (in any order) would normalise their keys with the
    statistics their queries saw; a plain ``randperm`` draws one with probability about
    ``W / C(N, b)`` (1/3 at 2 ranks x 2). Redrawn on the host, so no device sync; needs b >= 2.
    """
    own = torch.arange(n).view(-1, b)
    while True:
        order = torch.randperm(n)
        if not (order.view(-1, b).sort(dim=1).values[:, None] == own[None]).all(-1).any():
            return order


@full_precision
def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float):
    """MoCo's loss of queries q (b, d) with positive keys k (b, d) against negatives (K, d), and its accuracy."""
    logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ negatives.T], dim=1) / temperature  # (b, 1 + K)
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
    return F.cross_entropy(logits, target), (logits.argmax(dim=1) == 0).float().mean()


@OBJECTIVES.register("moco_v2")
class MoCo(nn.Module, Objective):
    @dataclasses.dataclass(kw_only=True)
    class Config:
        name: str = "moco_v2"
        temperature: float = 0.2  # v2's value (v1: 0.07)
        momentum: float = 0.999
        queue_size: int = 65536
        shuffle_bn: bool = True  # off only for backbones without BatchNorm (ViT)

        def validate(self) -> None:
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if self.queue_size < 1:
                raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__()
        if cfg.shuffle_bn and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            # Global statistics span every rank's keys whatever the shuffle: it would hide nothing.
            raise ConfigError("objective.shuffle_bn and model.sync_bn are both on, which defeats the shuffle "
                              "(BatchNorm statistics span all ranks): set model.sync_bn=false for MoCo's shuffle-BN")
        self.model = model
        self.key_encoder = Momentum(cfg.momentum, model=model)
        self.queue = FeatureQueue(cfg.queue_size, key=model.head_dim)
        self.temperature = cfg.temperature
        self.shuffle_bn = cfg.shuffle_bn

    def check(self, global_batch: int, world_size: int) -> None:
        super().check(global_batch, world_size)
        if self.shuffle_bn and world_size > 1 and global_batch // world_size < 2:
            # A key alone in its slice would see exactly the statistics of its query alone in its batch.
            raise ValueError(f"objective.shuffle_bn needs data.batch_size >= 2, got {global_batch // world_size}")

    def end_step(self) -> None:
        self.key_encoder.update()  # after the optimizer step, as MoCo updates before the next keys

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q = F.normalize(self.model(batch["view1"]).float(), dim=-1)  # (b, d), fp32 under bf16
        with torch.no_grad():
            key_encoder = self.key_encoder["model"]
            k = shuffled_forward(key_encoder, batch["view2"]) if self.shuffle_bn else key_encoder(batch["view2"])
            k = F.normalize(k.float(), dim=-1)  # (b, d)
            negatives = self.queue.get("key").clone().float()  # (K, d); cloned: enqueue below writes in place
        loss, accuracy = info_nce(q, k, negatives, self.temperature)
        if self.training:
            self.queue.enqueue(key=k)
        return {"loss": loss, "info_nce": loss.detach(), "accuracy": accuracy.detach()}
