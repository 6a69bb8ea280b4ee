"""Image/text encoders as the curation and evaluation stages use them, whatever trained them.

``load_encoder(spec)`` returns an :class:`Encoder`: a model with ``encode_image`` and
``encode_text`` plus its eval preprocessing and tokenizer (open_clip's
``create_model_and_transforms`` + ``get_tokenizer`` contract). Specs:

- ``open_clip:MODEL[:PRETRAINED]``: any open_clip architecture; PRETRAINED is a tag or a
  local weights file (tags need the hub, which tests and the demo never use).
- ``open_clip:local-dir:FOLDER`` or just ``FOLDER``: an open_clip model folder
  (``open_clip_config.json`` + weights), e.g. one written by ``python -m train.export --to open_clip``.
- anything else: a run, checkpoints or ``step_*`` directory written by this project's
  trainer. The model is rebuilt from the config stored in the checkpoint, its weights read
  from the checkpoint's ``model.safetensors`` (no DeepSpeed import; older checkpoints are
  consolidated from whatever ZeRO stage wrote them), and the eval preprocessing and tokenizer
  come from the model's data contract. The model is the objective's ``model`` (for ALBEF the
  whole ALBEF model, with its ITM head).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from pipeline.core import config as config_io
from pipeline.core.io import exists
from pipeline.core.registry import Registry
from train import checkpoint, parallel, tokenizers
from train.config import TrainConfig
from train.registry import MODELS, OBJECTIVES
from train.transforms import TRANSFORMS

LOADERS: Registry = Registry("encoder loader")


@dataclasses.dataclass
class Encoder:
    """``model.encode_image(images) -> (B, D)``, ``model.encode_text(**tokens) -> (B, D)``."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W) float tensor
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]]  # -> {"input_ids", "attention_mask"} on the device
    name: str

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) unit-norm fp32 embeddings."""
        return nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """B texts -> (B, D) unit-norm fp32 embeddings."""
        return nn.functional.normalize(self.model.encode_text(**self.tokenize(texts)).float(), dim=-1)


def load_encoder(spec: str, device: str = "cpu") -> Encoder:
    if exists(f"{spec}/open_clip_config.json"):  # a folder written by `python -m train.export --to open_clip`
        spec = f"open_clip:local-dir:{spec}"
    encoder = LOADERS.build("open_clip" if spec.startswith("open_clip:") else "checkpoint", spec, device)
    encoder.model.eval()
    return encoder


# ---------------------------------------------------------------------------- open_clip models


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

    name, pretrained = spec.removeprefix("open_clip:"), None
    if not name.startswith("local-dir:"):  # a folder holds its weights; a name may be followed by them
        name, _, pretrained = name.partition(":")
        pretrained = pretrained or None
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


# ---------------------------------------------------------------------------- our checkpoints


def load_objective(spec: str) -> tuple[torch.nn.Module, TrainConfig]:
    """The trained objective (holding the model) of a run, checkpoints or step_* directory, on CPU."""
    folder, tag = checkpoint.resolve(spec)
    cfg = config_io.load(TrainConfig, f"{folder}/{tag}/config.yaml")
    # The checkpoint holds every weight: the initial weights a run started from (model.init_from) are not
    # read again, and may be gone.
    model_cfg = dataclasses.replace(cfg.model, init_from="") if getattr(cfg.model, "init_from", "") else cfg.model
    objective = OBJECTIVES.build(cfg.objective.name, cfg.objective, MODELS.build(cfg.model.name, model_cfg))
    state = checkpoint.read_weights(folder, tag)
    if state is None:  # a checkpoint written before model.safetensors existed
        state = parallel.consolidated_state_dict(folder, tag)
    # Non-persistent buffers are rebuilt by the constructor; every saved key must match exactly.
    # Frozen parameters (momentum encoders) are not among the consolidated fp32 weights; the
    # returned objective is for its online model, so they stay as built.
    missing, unexpected = objective.load_state_dict(state, strict=False)
    # remove_duplicate=False: a tied weight of a frozen copy (ALBEF momentum MLM head) is frozen under each of its names
    frozen = {name for name, p in objective.named_parameters(remove_duplicate=False) if not p.requires_grad}
    persistent = set(objective.state_dict()) - frozen
    if unexpected or set(missing) & persistent:
        raise KeyError(f"checkpoint {folder}/{tag} does not match {cfg.model.name}: "
                       f"missing {sorted(set(missing) & persistent)}, unexpected {sorted(unexpected)}")
    return objective.eval(), cfg


@LOADERS.register("checkpoint")
def _load_checkpoint(spec: str, device: str) -> Encoder:
    objective, _ = load_objective(spec)
    model = objective.model.to(device)
    preprocess = TRANSFORMS.build("eval", None, model.contract)
    tokenize = tokenizers.build(model.contract)

    def tokenize_to_device(texts: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in tokenize(texts).items()}

    return Encoder(model=model, preprocess=lambda image: preprocess(image)["image"], tokenize=tokenize_to_device,
                   name=spec)
