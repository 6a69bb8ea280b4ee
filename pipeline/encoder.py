"""Image/text encoders as the data and evaluation stages use them, whatever trained them.

``load_encoder(spec)`` returns an :class:`Encoder`: a model with ``encode_image`` and
``encode_text`` plus its eval preprocessing and tokenizer (open_clip's
``create_model_and_transforms`` + ``get_tokenizer`` contract). Specs:

- ``open_clip:MODEL[:PRETRAINED]``: any open_clip architecture; PRETRAINED is a tag or a
  local weights file (tags need the hub, which tests and the demo never use).
- anything else: a checkpoint or run directory written by this project's trainer
  (loaded by the ``checkpoint`` loader that ``train/export.py`` registers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from pipeline.registry import Registry

LOADERS: Registry = Registry("encoder loader")


@dataclasses.dataclass
class Encoder:
    """``model.encode_image(images) -> (B, D)``, ``model.encode_text(**tokens) -> (B, D)``."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W) float tensor
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]]  # -> {"input_ids", "attention_mask"}
    name: str

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return nn.functional.normalize(self.model.encode_text(**self.tokenize(texts)).float(), dim=-1)


def load_encoder(spec: str, device: str = "cpu") -> Encoder:
    scheme = spec.split(":", 1)[0] if spec.startswith("open_clip:") else "checkpoint"
    if scheme == "checkpoint":
        import train.export  # noqa: F401  (registers the loader for this project's checkpoints)
    encoder = LOADERS.build(scheme, spec, device)
    encoder.model.eval()
    return encoder


class _OpenClipModel(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_image(images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.encode_text(input_ids)


@LOADERS.register("open_clip")
def _load_open_clip(spec: str, device: str) -> Encoder:
    import open_clip

    _, name, *rest = spec.split(":", 2)
    pretrained = rest[0] if rest else None
    if name.endswith(".json"):  # an architecture of one's own: open_clip:path/to/NAME.json[:WEIGHTS]
        open_clip.add_model_config(name)
        name = name.rsplit("/", 1)[-1].removesuffix(".json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random init (no weights offline) must be the same model in every process / array task
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    tokenizer = open_clip.get_tokenizer(name)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        ids = tokenizer(texts).to(device)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    return Encoder(_OpenClipModel(model), preprocess, tokenize, spec)
