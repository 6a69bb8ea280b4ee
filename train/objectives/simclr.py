"""SimCLR (Chen et al. 2020): NT-Xent between two augmented views over the global batch."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from train.gather import all_gather_with_grad, world
from train.objective import CachesFeatures, Objective
from train.precision import full_precision
from train.registry import OBJECTIVES


@full_precision
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of this rank's 2b views against the 2N views of all ranks, averaged over local views.

    ``z1``, ``z2``: (b, d) L2-normalised projections of two views of the same b images. Each
    view's positive is the other view of its image; the other 2N - 2 views are negatives and
    its similarity with itself is masked out. With equal local batches, the mean of this loss
    over ranks is the single-process loss on the global batch, and since the gather's backward
    sums every rank's gradient into the owner, averaging gradients over ranks (as data
    parallelism does) yields that loss's gradients.
    """
    rank, world_size = world()
    b = z1.shape[0]
    n = b * world_size
    gathered = all_gather_with_grad(torch.stack([z1, z2], dim=1))  # (N, 2, d), rank order
    views = torch.cat([gathered[:, 0], gathered[:, 1]])  # (2N, d): all first views, then second
    anchors = torch.cat([z1, z2])  # (2b, d)
    logits = (anchors @ views.T).float() / temperature  # (2b, 2N)
    own = torch.arange(b, device=z1.device) + rank * b  # this rank's images in the global batch
    self_column = torch.cat([own, own + n])  # (2b,)
    positive_column = torch.cat([own + n, own])  # (2b,)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * b, device=z1.device), self_column] = True
    return F.cross_entropy(logits.masked_fill(is_self, float("-inf")), positive_column)


@OBJECTIVES.register("simclr")
class SimCLR(CachesFeatures, nn.Module, Objective):
    @dataclasses.dataclass(kw_only=True)
    class Config:
        name: str = "simclr"
        temperature: float = 0.1  # SimCLR's ImageNet value (0.5 for CIFAR-sized batches)

        def validate(self) -> None:
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__()
        self.model = model
        self.temperature = cfg.temperature

    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # One pass over both views, so BatchNorm normalises them with the same statistics.
        views = torch.cat([batch["view1"], batch["view2"]])  # (2b, 3, H, W)
        z1, z2 = F.normalize(self.model(views).float(), dim=-1).chunk(2)  # (b, d) each, fp32 under bf16
        return {"z1": z1, "z2": z2}

    def loss(self, features: dict[str, torch.Tensor], owns_parameters: bool) -> dict[str, torch.Tensor]:
        loss = nt_xent(features["z1"], features["z2"], self.temperature)
        return {"loss": loss, "nt_xent": loss.detach()}
