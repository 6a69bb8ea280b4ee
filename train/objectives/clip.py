"""CLIP's symmetric InfoNCE over the global batch, dense or in memory-bounded chunks.

Each rank contrasts its b local features against the N = world * b features of all ranks,
gathered *with* gradient (open_clip's ``local_loss=True, gather_with_grad=True``): the mean
of the ranks' losses is the loss over the global batch, and since the gather's backward sums
every rank's gradient into the owner, data-parallel gradient averaging yields exactly that
loss's gradients. With several captions per image (COCO-style shards), a row's softmax leaves
out the other pairs of its image (same ``image_id``, gathered beside the features).

The chunked form writes the loss of row i as ``lse_i - s * q_i . k_i+``: the positive term is
a row-wise dot product, and the log-sum-exp over N columns is computed in (c, c) blocks by
:class:`ChunkedLogSumExp`, whose backward recomputes each block from the saved lse. Peak
memory is O(c^2 + N * D) instead of the O(b * N) of the (b, N) logits.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from train.gather import all_gather_no_grad, all_gather_with_grad, world
from train.objective import CachesFeatures, Objective
from train.parallel import clamp_
from train.precision import full_precision
from train.registry import OBJECTIVES


def _block(buffer: torch.Tensor, q_block: torch.Tensor, k_block: torch.Tensor) -> torch.Tensor:
    """``q_block @ k_block.T`` written into ``buffer``: one (c, c) allocation serves every block."""
    out = buffer.view(-1)[: q_block.shape[0] * k_block.shape[0]].view(q_block.shape[0], k_block.shape[0])
    return torch.mm(q_block, k_block.T, out=out)


class ChunkedLogSumExp(torch.autograd.Function):
    """``lse_i = log sum_j exp(scale * q_i . k_j)`` for q (b, D), k (N, D), in (c, c) blocks."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, chunk: int,
                excluded: "Excluded | None" = None) -> torch.Tensor:
        q_scaled = q * scale  # (b, D): scaling q is cheaper than scaling every block
        buffer = q.new_empty(min(chunk, q.shape[0]) * min(chunk, k.shape[0]))
        lse = torch.full((q.shape[0],), float("-inf"), dtype=q.dtype, device=q.device)  # (b,)
        for rows in range(0, q.shape[0], chunk):
            for cols in range(0, k.shape[0], chunk):
                logits = _block(buffer, q_scaled[rows:rows + chunk], k[cols:cols + chunk])  # (c, c)
                if excluded is not None:
                    logits.masked_fill_(excluded.block(rows, cols, logits.shape), float("-inf"))
                # (c, 1), for a stable exp; finite when a row's whole block is excluded
                peak = logits.amax(dim=1, keepdim=True).clamp_(min=torch.finfo(logits.dtype).min)
                block_lse = logits.sub_(peak).exp_().sum(dim=1).log_().add_(peak[:, 0])  # (c,)
                lse[rows:rows + chunk] = torch.logaddexp(lse[rows:rows + chunk], block_lse)
        ctx.save_for_backward(q, k, scale, lse)
        ctx.chunk, ctx.excluded = chunk, excluded
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):
        q, k, scale, lse = ctx.saved_tensors
        chunk, q_scaled, excluded = ctx.chunk, q * scale, ctx.excluded
        buffer = q.new_empty(min(chunk, q.shape[0]) * min(chunk, k.shape[0]))
        # d lse_i / d logit_ij = p_ij (softmax); w_ij = grad_i * p_ij; logit_ij = scale * q_i . k_j
        dq = torch.zeros_like(q)  # sum_j w_ij k_j      (b, D), before the factor scale
        dk = torch.zeros_like(k)  # sum_i w_ij q_i      (N, D), before the factor scale
        for rows in range(0, q.shape[0], chunk):
            for cols in range(0, k.shape[0], chunk):
                k_block = k[cols:cols + chunk]
                w = _block(buffer, q_scaled[rows:rows + chunk], k_block)  # (c, c) logits, then weights
                if excluded is not None:
                    w.masked_fill_(excluded.block(rows, cols, w.shape), float("-inf"))
                w.sub_(lse[rows:rows + chunk, None]).exp_().mul_(grad_lse[rows:rows + chunk, None])
                dq[rows:rows + chunk].addmm_(w, k_block)
                dk[cols:cols + chunk].addmm_(w.T, q[rows:rows + chunk])
        dscale = (dq * q).sum().reshape(scale.shape)  # sum_ij w_ij q_i . k_j
        return dq.mul_(scale), dk.mul_(scale), dscale, None, None


class Excluded:
    """The columns a row's softmax leaves out: those of the row's image (``row_ids[i] == col_ids[j]``)
    except its own positive. Several captions of one image are not each other's negatives."""

    def __init__(self, row_ids: torch.Tensor, col_ids: torch.Tensor, positives: torch.Tensor):
        self.row_ids, self.col_ids, self.positives = row_ids, col_ids, positives  # (b,), (N,), (b,)

    def block(self, rows: int, cols: int, shape: torch.Size) -> torch.Tensor:
        """(c_rows, c_cols) bool mask of the block at (rows, cols)."""
        r, c = slice(rows, rows + shape[0]), slice(cols, cols + shape[1])
        columns = torch.arange(cols, cols + shape[1], device=self.col_ids.device)
        return (self.row_ids[r, None] == self.col_ids[None, c]) & (columns[None] != self.positives[r, None])

    def dense(self) -> torch.Tensor:
        return self.block(0, 0, torch.Size((self.row_ids.shape[0], self.col_ids.shape[0])))


def info_nce(q: torch.Tensor, k: torch.Tensor, k_all: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor,
             chunk: int, excluded: Excluded | None = None) -> torch.Tensor:
    """Mean over the b local rows of -log softmax(scale * q @ k_all.T)[i, positive_i], the ``excluded``
    columns left out of the softmax.

    ``k`` is this rank's slice of ``k_all`` (``k_all[positives] == k``); the chunked form takes
    the positive logits from it, which avoids an (N, D) gradient for an index into ``k_all``.
    """
    if chunk:
        positive_logits = scale * (q * k).sum(1)  # (b,)
        return (ChunkedLogSumExp.apply(q, k_all, scale, chunk, excluded) - positive_logits).mean()
    logits = scale * q @ k_all.T  # (b, N)
    if excluded is not None:
        logits = logits.masked_fill(excluded.dense(), float("-inf"))
    return F.cross_entropy(logits, positives)


@full_precision
def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, chunk: int = 0,
              image_id: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's (b, D) normalised features against all ranks' features.
    ``image_id`` (b,): pairs of one image are not each other's negatives; None: every pair its own image."""
    rank, _ = world()
    image_all, text_all = all_gather_with_grad(image), all_gather_with_grad(text)  # (N, D), rank order
    positives = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]  # (b,)
    # Gathered beside the features, (b,) on every rank: the same collective whatever the ids are.
    excluded = None if image_id is None else Excluded(image_id, all_gather_no_grad(image_id), positives)
    scale = logit_scale.exp()
    image_to_text = info_nce(image, text, text_all, positives, scale, chunk, excluded)
    text_to_image = info_nce(text, image, image_all, positives, scale, chunk, excluded)
    return (image_to_text + text_to_image) / 2


@OBJECTIVES.register("clip")
class CLIPObjective(CachesFeatures, nn.Module, Objective):
    @dataclasses.dataclass(kw_only=True)
    class Config:
        name: str = "clip"
        init_temperature: float = 0.07  # logit scale starts at 1 / 0.07
        max_logit_scale: float = 100.0
        learn_temperature: bool = True
        chunk_size: int = 0  # 0 = dense (b, N) logits; else the block size of the memory-bounded form

        def validate(self) -> None:
            if self.init_temperature <= 0 or self.max_logit_scale <= 1:
                raise ValueError("init_temperature must be > 0 and max_logit_scale > 1")
            if self.chunk_size < 0:
                raise ValueError(f"chunk_size must be >= 0, got {self.chunk_size}")

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__()
        self.model = model
        self.cfg = cfg
        init = torch.full((1,), math.log(1 / cfg.init_temperature))  # (1,): DeepSpeed cannot broadcast 0-d params
        self.logit_scale = nn.Parameter(init, requires_grad=cfg.learn_temperature)
        self.max_log_scale = math.log(cfg.max_logit_scale)

    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = F.normalize(self.model.encode_image(batch["image"]).float(), dim=-1)  # (b, D), fp32 under bf16
        text = F.normalize(self.model.encode_text(batch["input_ids"], batch["attention_mask"]).float(), dim=-1)
        return {"image": image, "text": text, "image_id": batch["image_id"]}

    def loss(self, features: dict[str, torch.Tensor], owns_parameters: bool) -> dict[str, torch.Tensor]:
        logit_scale = self.logit_scale if owns_parameters else self.logit_scale.detach()
        logit_scale = logit_scale.float()  # within bounds: end_step clamps the optimizer's copy
        loss = clip_loss(features["image"], features["text"], logit_scale, self.cfg.chunk_size, features["image_id"])
        return {"loss": loss, "logit_scale": logit_scale.detach().exp()}

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale"}

    @torch.no_grad()
    def end_step(self) -> None:
        clamp_(self.logit_scale, max=self.max_log_scale)
