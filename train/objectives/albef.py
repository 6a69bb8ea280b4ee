"""ALBEF's objective (Li et al. 2021): ITC + ITM + MLM with momentum distillation.

- ITC: student features against the momentum features of the batch plus the queues; targets
  mix the momentum model's softmax with the pairs (any key with the same ``image_id`` is a
  positive: captions of one image are never each other's negatives) by ``alpha``, which ramps
  up over the first epoch.
- ITM: one hard negative text per image and one hard negative image per text, drawn from the
  contrastive softmax with every candidate of the same image excluded, for the whole batch in one
  vectorised Gumbel-max draw (the reference loops over samples with a host sync each).
  Candidates come from the global batch (BLIP), gathered with gradient so the owner rank's
  encoders learn from them, or from the local batch (ALBEF) with ``itm_negatives: local``.
- MLM: 15% of the real, non-special tokens, 80/10/10 [MASK]/random/kept, predicted from the
  fused text; the loss is distilled from the momentum model by the same ``alpha``.

The momentum copies and the queues are part of this module (frozen parameters and buffers),
so DeepSpeed saves, restores and (ZeRO-3) partitions them with everything else.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from train.gather import all_gather_no_grad, all_gather_with_grad, world
from train.momentum import Momentum
from train.objective import Objective
from train.parallel import clamp_
from train.precision import full_precision
from train.queue import FeatureQueue
from train.registry import OBJECTIVES


@full_precision
def hard_negatives(similarity: torch.Tensor, same_id: torch.Tensor, generator: torch.Generator | None = None):
    """One candidate per row drawn from ``softmax(similarity)`` over the entries not ``same_id``.

    Gumbel-max: ``argmax(s + G)`` with i.i.d. standard Gumbel noise ``G`` is an exact sample of
    ``softmax(s)``, for every row at once and without a host sync. Returns (indices (b,), valid
    (b,)); ``valid`` is False for rows whose candidates all share the id (nothing to draw).
    """
    logits = similarity.float().masked_fill(same_id, float("-inf"))  # (b, N)
    uniform = torch.rand(logits.shape, device=logits.device, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
    return (logits + gumbel).argmax(dim=1), (~same_id).any(dim=1)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor, mask_id: int,
                vocab_size: int, probability: float, generator: torch.Generator | None = None):
    """BERT masking: (masked ids, labels); labels are -100 except at the chosen positions."""
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special_ids)  # never [CLS]/[SEP]/[PAD]
    draw = functools.partial(torch.rand, input_ids.shape, device=input_ids.device, generator=generator)
    chosen = maskable & (draw() < probability)
    labels = input_ids.masked_fill(~chosen, -100)
    action = draw()
    random_ids = torch.randint(vocab_size, input_ids.shape, device=input_ids.device, generator=generator)
    masked = torch.where(chosen & (action < 0.8), mask_id, input_ids)  # 80% [MASK]
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)  # 10% random, 10% kept
    return masked, labels


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits.float(), dim=-1) * targets).sum(-1).mean()


@OBJECTIVES.register("albef")
class ALBEFObjective(nn.Module, Objective):
    @dataclasses.dataclass(kw_only=True)
    class Config:
        name: str = "albef"
        momentum: float = 0.995
        queue_size: int = 65536
        alpha: float = 0.4  # weight of the momentum model's soft targets (ITC and MLM)
        alpha_rampup_epochs: float = 1.0  # alpha grows linearly from 0 over this many epochs
        init_temperature: float = 0.07
        temperature_range: tuple[float, float] = (0.001, 0.5)
        mlm_probability: float = 0.15
        itm_negatives: Literal["global", "local"] = "global"  # BLIP's world-batch sampling, or ALBEF's
        seed: int = 0  # masking and negative sampling draw from a generator seeded by (seed, step, rank)

        def validate(self) -> None:
            if not 0 <= self.alpha <= 1 or not 0 < self.mlm_probability < 1:
                raise ValueError("alpha must be in [0, 1] and mlm_probability in (0, 1)")
            low, high = self.temperature_range
            if not 0 < low <= self.init_temperature <= high:
                raise ValueError(f"need 0 < {low} <= init_temperature {self.init_temperature} <= {high}")

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__()
        from transformers import AutoTokenizer

        self.cfg, self.model = cfg, model
        self.momentum = Momentum(cfg.momentum, model=model)
        dim = model.image_projection.out_features
        self.queue = FeatureQueue(cfg.queue_size, image=dim, text=dim, id=None)
        # Shape (1,), not (): DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as.
        self.temperature = nn.Parameter(torch.full((1,), cfg.init_temperature))
        tokenizer = AutoTokenizer.from_pretrained(model.contract.tokenizer_path, local_files_only=True)
        self.mask_id, self.vocab_size = tokenizer.mask_token_id, model.mlm_head.bias.numel()
        self.register_buffer("special_ids", torch.tensor(tokenizer.all_special_ids), persistent=False)
        self.alpha, self.step = cfg.alpha, 0

    def start_step(self, step: int, steps_per_epoch: int) -> None:
        self.step = step
        rampup = self.cfg.alpha_rampup_epochs * steps_per_epoch
        self.alpha = self.cfg.alpha * min(1.0, step / rampup) if rampup > 0 else self.cfg.alpha

    @torch.no_grad()
    def end_step(self) -> None:
        clamp_(self.temperature, *self.cfg.temperature_range)
        self.momentum.update()

    def no_weight_decay(self) -> set[str]:
        return {"temperature"}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, ids, mask, image_id = batch["image"], batch["input_ids"], batch["attention_mask"], batch["image_id"]
        temperature = self.temperature.float()  # within bounds: end_step clamps the optimizer's copy
        image_tokens, text_tokens = self.model.image_tokens(images), self.model.text_tokens(ids, mask)
        image_feat, text_feat = self.model.image_embedding(image_tokens), self.model.text_embedding(text_tokens)
        teacher = self.momentum["model"]
        with torch.no_grad():
            teacher_image_tokens = teacher.image_tokens(images)
            image_feat_m = teacher.image_embedding(teacher_image_tokens)  # (b, D)
            text_feat_m = teacher.text_embedding(teacher.text_tokens(ids, mask))
        itc = self.contrastive_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_id, temperature)
        # A function of the step, not of the global RNG: a resumed run draws exactly the same.
        rank, world_size = world()
        generator = torch.Generator(ids.device).manual_seed((self.cfg.seed * 1_000_003 + self.step) * world_size + rank)
        itm = self.matching_loss(image_tokens, text_tokens, mask, image_feat, text_feat, image_id, temperature,
                                 generator)
        mlm = self.masked_lm_loss(ids, mask, image_tokens, teacher_image_tokens, generator)
        if self.training:
            self.queue.enqueue(image=image_feat_m, text=text_feat_m, id=image_id)
        return {"loss": itc + itm + mlm, "itc": itc.detach(), "itm": itm.detach(), "mlm": mlm.detach(),
                "temperature": temperature.detach()[0], "alpha": torch.tensor(self.alpha, device=itc.device)}

    @full_precision
    def contrastive_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, image_id, temperature):
        """ITC of the student (b, D) against [batch momentum keys; queue] (b + K, D)."""
        with torch.no_grad():
            image_keys = torch.cat([image_feat_m, self.queue.get("image").clone()]).float()  # (b + K, D)
            text_keys = torch.cat([text_feat_m, self.queue.get("text").clone()]).float()
            positives = (image_id[:, None] == torch.cat([image_id, self.queue.get("id").clone()])[None]).float()
            pairs = positives / positives.sum(1, keepdim=True)  # (b, b + K), rows sum to 1
            image_targets = self.alpha * F.softmax(image_feat_m.float() @ text_keys.T / temperature, 1)
            text_targets = self.alpha * F.softmax(text_feat_m.float() @ image_keys.T / temperature, 1)
        image_to_text = soft_cross_entropy(image_feat.float() @ text_keys.T / temperature,
                                           image_targets + (1 - self.alpha) * pairs)
        text_to_image = soft_cross_entropy(text_feat.float() @ image_keys.T / temperature,
                                           text_targets + (1 - self.alpha) * pairs)
        return (image_to_text + text_to_image) / 2

    def matching_loss(self, image_tokens, text_tokens, mask, image_feat, text_feat, image_id, temperature, generator):
        """ITM on b positives, b (image, hard negative text) and b (hard negative image, text) pairs."""
        gather, gather_ids = ((all_gather_with_grad, all_gather_no_grad) if self.cfg.itm_negatives == "global"
                              else (nn.Identity(), nn.Identity()))
        with torch.no_grad():
            same_id = image_id[:, None] == gather_ids(image_id)[None]  # (b, N), includes the positive
            text_index, image_has = hard_negatives(image_feat @ gather_ids(text_feat.detach()).T / temperature, same_id,
                                                   generator)
            image_index, text_has = hard_negatives(text_feat @ gather_ids(image_feat.detach()).T / temperature, same_id,
                                                    generator)
        all_text, all_mask, all_images = gather(text_tokens), gather_ids(mask), gather(image_tokens)
        fused = self.model.fuse(torch.cat([text_tokens, all_text[text_index], text_tokens]),
                                torch.cat([mask, all_mask[text_index], mask]),
                                torch.cat([image_tokens, image_tokens, all_images[image_index]]))
        b = image_tokens.shape[0]
        labels = torch.cat([torch.ones(b, dtype=torch.long, device=mask.device),  # rows without a negative: ignored
                            torch.zeros(b, dtype=torch.long, device=mask.device).masked_fill(~image_has, -100),
                            torch.zeros(b, dtype=torch.long, device=mask.device).masked_fill(~text_has, -100)])
        return F.cross_entropy(self.model.itm_logits(fused).float(), labels)

    def masked_lm_loss(self, ids, mask, image_tokens, teacher_image_tokens, generator):
        """MLM distilled from the momentum model; the vocabulary head runs on masked tokens only."""
        masked, labels = mask_tokens(ids, mask, self.special_ids, self.mask_id, self.vocab_size,
                                     self.cfg.mlm_probability, generator)
        chosen = labels != -100  # (b, L)
        hidden = self.model.fuse(self.model.text_tokens(masked, mask), mask, image_tokens)[chosen]  # (M, W)
        logits = self.model.mlm_head(hidden).float()  # (M, vocab)
        teacher = self.momentum["model"]
        with torch.no_grad():
            fused_m = teacher.fuse(teacher.text_tokens(masked, mask), mask, teacher_image_tokens)[chosen]
            soft = F.softmax(teacher.mlm_head(fused_m).float(), dim=-1)
        count = chosen.sum().clamp(min=1)  # a batch without any maskable token contributes 0
        hard = F.cross_entropy(logits, labels[chosen], reduction="sum") / count
        distilled = -(F.log_softmax(logits, dim=-1) * soft).sum() / count
        return (1 - self.alpha) * hard + self.alpha * distilled
