"""Hand-built encoders with known behaviour for the evaluation tests.

- :func:`palette_encoder`: an oracle. An image's embedding is the one-hot of the palette
  colour nearest its mean colour; a text's embedding is the one-hot of the colour word it
  names. On images filled with palette colours it is a perfect zero-shot model.
- :func:`projection_encoder`: fixed random projections of pixels and of hashed words; an
  arbitrary but deterministic model for comparing 1-rank and 2-rank runs.
- :class:`ItmHead`: adds ALBEF's interface (``image_tokens``, ``itm_score``) to either.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torchvision.transforms.functional import pil_to_tensor, resize

from train.encoder import Encoder

PALETTE = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255),
}
VOCAB = 97  # hashed word ids (0 is padding)


def preprocess(image) -> torch.Tensor:
    return resize(pil_to_tensor(image.convert("RGB")), [8, 8], antialias=True).float() / 255.0  # (3, 8, 8)


def tokenize(texts: list[str], length: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.zeros((len(texts), length), dtype=torch.long)
    for row, text in enumerate(texts):
        words = re.findall(r"[a-z]+", text.lower())[:length]
        ids[row, : len(words)] = torch.tensor([1 + sum(map(ord, w)) % (VOCAB - 1) for w in words] or [], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class PaletteModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("colours", torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 255.0)
        word_ids = tokenize(list(PALETTE))["input_ids"][:, 0]
        self.register_buffer("word_to_class", torch.full((VOCAB,), -1).index_put_((word_ids,), torch.arange(len(PALETTE))))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean((2, 3))  # (B, 3)
        nearest = torch.cdist(mean, self.colours).argmin(1)
        return nn.functional.one_hot(nearest, len(PALETTE)).float()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        classes = self.word_to_class[input_ids]  # (B, L), -1 for other words
        named = (classes[..., None] == torch.arange(len(PALETTE))).float().sum(1)  # (B, C)
        return named + 1e-3  # texts naming no colour still have a direction


class ProjectionModel(nn.Module):
    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image_proj = nn.Parameter(torch.randn(3 * 8 * 8, dim, generator=g), requires_grad=False)
        self.word_emb = nn.Parameter(torch.randn(VOCAB, dim, generator=g), requires_grad=False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return (images.flatten(1) - 0.5) @ self.image_proj  # centred, so images point in varied directions

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (self.word_emb[input_ids] * attention_mask[..., None]).sum(1)


class ItmHead:
    """ALBEF's interface on top of a model: the image tokens are its embedding (one token); the
    ITM logit is the cosine of the pair's embeddings, times ``itm_sign`` (-1 reverses the ITC
    order, so reranking visibly changes the ranking)."""

    itm_sign = 1.0

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)[:, None, :]  # (B, 1, D)

    def itm_score(self, image_tokens, input_ids, attention_mask) -> torch.Tensor:
        image = nn.functional.normalize(image_tokens[:, 0], dim=-1)
        text = nn.functional.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        return self.itm_sign * (image * text).sum(-1)  # (K,)


class PaletteItm(ItmHead, PaletteModel):
    pass


class ProjectionItm(ItmHead, ProjectionModel):
    pass


class ProjectionWithOracleItm(ProjectionModel):
    """Random-projection ITC with the palette oracle as its ITM head: only reranking gets it right."""

    def __init__(self):
        super().__init__()
        self.oracle = PaletteItm()

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.oracle.image_tokens(images)

    def itm_score(self, image_tokens, input_ids, attention_mask) -> torch.Tensor:
        return self.oracle.itm_score(image_tokens, input_ids, attention_mask)


def _encoder(model: nn.Module, itm: str | None, name: str) -> Encoder:
    if itm == "reversed":
        model.itm_sign = -1.0
    return Encoder(model.eval(), preprocess, tokenize, name)


def palette_encoder(itm: str | None = None) -> Encoder:
    return _encoder(PaletteModel() if itm is None else PaletteItm(), itm, "palette")


def projection_encoder(itm: str | None = None) -> Encoder:
    return _encoder(ProjectionModel() if itm is None else ProjectionItm(), itm, "projection")
