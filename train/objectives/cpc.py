"""CPC v2 (Hénaff et al. 2019): InfoNCE of row-ahead patch predictions over the global batch.

The prediction for patch (i + k, j) of an image must pick that patch's embedding out of the
embeddings of every patch of every image of the global batch (its own image's other patches
included), gathered with gradient across ranks. Scores are cosine similarities over a
temperature, not the paper's raw dot products: those grow without bound, and with bf16 inputs
their rounding error grows with them (the tiny config's bf16 loss rose from 7.2 to 9.5 within 5
steps while fp32 fell; bounded scores keep bf16 on the fp32 curve, as for SimCLR and CLIP).
The N * G^2 columns make large logits: with ``chunk_size`` the CLIP loss's memory-bounded
log-sum-exp computes them in blocks.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from train.gather import all_gather_with_grad, world
from train.objective import CachesFeatures, Objective
from train.objectives.clip import info_nce
from train.precision import full_precision
from train.registry import OBJECTIVES


@full_precision
def cpc_loss(patches: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor, temperature: float,
             chunk: int = 0) -> torch.Tensor:
    """Mean InfoNCE of this rank's predictions against the patches of all ranks.

    ``patches``: (b, P, D) patch embeddings; ``predictions``: (b, M, D); ``targets``: (M,) the
    patch index each prediction is for. Every rank gathers the same (b * P, D), so with equal
    local batches the mean over ranks is the loss on the global batch and data-parallel
    gradient averaging yields its gradients (as for CLIP).
    """
    rank, _ = world()
    b, count, dim = patches.shape
    patches, predictions = F.normalize(patches, dim=-1), F.normalize(predictions, dim=-1)
    every_patch = all_gather_with_grad(patches.reshape(b * count, dim))  # (N * P, D), rank order
    images = torch.arange(b, device=patches.device) + rank * b  # this rank's images in the global batch
    positives = (images[:, None] * count + targets[None]).reshape(-1)  # (b * M,)
    own = patches[:, targets].reshape(-1, dim)  # (b * M, D): the positive of each prediction, local
    scale = torch.full((1,), 1 / temperature, dtype=patches.dtype, device=patches.device)
    return info_nce(predictions.reshape(-1, dim), own, every_patch, positives, scale, chunk)


@OBJECTIVES.register("cpc")
class CPC(CachesFeatures, nn.Module, Objective):
    @dataclasses.dataclass(kw_only=True)
    class Config:
        name: str = "cpc"
        temperature: float = 0.1
        chunk_size: int = 0  # 0 = dense (b * M, N * P) logits; else the block size of the memory-bounded form

        def validate(self) -> None:
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if self.chunk_size < 0:
                raise ValueError(f"chunk_size must be >= 0, got {self.chunk_size}")

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__()
        self.model = model
        self.temperature, self.chunk_size = cfg.temperature, cfg.chunk_size

    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        patches, predictions = self.model(batch["patches"])  # bf16 under autocast: cpc_loss runs in fp32
        return {"patches": patches, "predictions": predictions}

    def loss(self, features: dict[str, torch.Tensor], owns_parameters: bool) -> dict[str, torch.Tensor]:
        loss = cpc_loss(features["patches"], features["predictions"], self.model.target_index, self.temperature,
                        self.chunk_size)
        return {"loss": loss, "info_nce": loss.detach()}
