"""CLIP's two towers: a timm image tower and a text tower, each with a linear projection.

The model returns features only; the temperature and the loss live in the objective
(``train/objectives/clip.py``). Variants (``clip_tiny``, ``clip_vit_b32``, ...) are rows of
``VARIANTS`` registered in a loop; a config may override any field of a variant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.core.config import ConfigError
from pipeline.core.registry import Registry
from train import interop
from train.contract import DataContract
from train.models.towers import timm_tower
from train.registry import register_variants

TEXT_TOWERS: Registry = Registry("text tower")


@dataclasses.dataclass(kw_only=True)
class ClipConfig:
    name: str
    embed_dim: int = 512
    image_tower: str = "vit_base_patch32_224"  # any timm model name
    image_tower_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra timm kwargs
    image_weights: str = ""  # optional local timm weights file (nothing is downloaded)
    image_size: int = 224
    text_tower: str = "transformer"  # a name in TEXT_TOWERS: "transformer" (CLIP's) or "hf"
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    vocab_size: int = 49408  # CLIP BPE
    context_length: int = 77
    hf_path: str = ""  # local Hugging Face encoder directory for text_tower "hf" (model + tokenizer)
    init_from: str = ""  # initial weights (fine-tuning): an open_clip checkpoint file or folder, or a Hugging Face CLIP folder

    def contract(self) -> DataContract:
        if self.text_tower == "hf":
            return DataContract(image_size=self.image_size, tokenizer="hf", tokenizer_path=self.hf_path,
                                context_length=self.context_length)
        return DataContract(image_size=self.image_size, tokenizer="clip_bpe", context_length=self.context_length)


class TextTransformer(nn.Module):
    """CLIP's text encoder: causal pre-norm transformer, pooled at the end-of-text token."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.text_width) * 0.01)
        layer = dict(d_model=cfg.text_width, nhead=cfg.text_heads, dim_feedforward=4 * cfg.text_width,
                     dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(**layer) for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)
        self.width = cfg.text_width
        self.grad_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]  # (B, L, W)
        # is_causal=True reaches scaled_dot_product_attention as is_causal with no mask (the float
        # mask only satisfies nn.MultiheadAttention's argument check), which lets CUDA take the
        # flash kernel; an explicit additive mask rules flash out.
        mask = self.causal_mask[:length, :length].to(x.dtype)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, src_mask=mask, is_causal=True, use_reentrant=False)
            else:
                x = block(x, src_mask=mask, is_causal=True)
        x = self.ln_final(x)
        # Causal attention: the last real token (end-of-text) has seen the whole caption.
        last = attention_mask.sum(1).clamp(min=1) - 1  # (B,)
        return x[torch.arange(x.shape[0], device=x.device), last]  # (B, W)


@TEXT_TOWERS.register("transformer")
def _transformer(cfg: ClipConfig) -> nn.Module:
    return TextTransformer(cfg)


class HFTextEncoder(nn.Module):
    """Any Hugging Face encoder from a local directory, pooled at its first ([CLS]) token."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(cfg.hf_path, local_files_only=True)
        self.width = self.encoder.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.encoder.gradient_checkpointing_enable()


@TEXT_TOWERS.register("hf")
def _hf(cfg: ClipConfig) -> nn.Module:
    return HFTextEncoder(cfg)


class CLIP(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.visual = timm_tower(cfg.image_tower, cfg.image_tower_args, cfg.image_weights)
        self.text = TEXT_TOWERS.build(cfg.text_tower, cfg)
        self.image_projection = nn.Linear(self.visual.num_features, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text.width, cfg.embed_dim, bias=False)
        self.contract = cfg.contract()
        if cfg.init_from:
            self.load_initial_weights(cfg.init_from, cfg.name)

    def load_initial_weights(self, source: str, name: str) -> None:
        """Every weight from ``source`` (see :func:`train.interop.initial_weights`); the architecture must match."""
        try:
            self.load_state_dict(interop.initial_weights(source), strict=True)
        except (RuntimeError, KeyError) as error:  # missing, unexpected or differently shaped weights
            detail = str(error).replace("\n", " ")[:600]
            raise ConfigError(f"model.init_from: {source} does not fit model {name} as configured "
                              f"(set model.* to the source's architecture): {detail}") from None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_projection(self.visual(images))  # (B, D), unnormalised

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = (input_ids != 0).long()
        return self.text_projection(self.text(input_ids, attention_mask))  # (B, D), unnormalised

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        if hasattr(self.text, "set_grad_checkpointing"):
            self.text.set_grad_checkpointing(enable)
        else:
            self.text.grad_checkpointing = enable


# Architecture numbers only; everything else keeps ClipConfig's defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "clip_tiny": dict(embed_dim=64, image_tower="vit_tiny_patch16_224", image_size=32,
                      image_tower_args=dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2),
                      text_width=64, text_layers=2, text_heads=2, context_length=32),
    "clip_tiny_resnet": dict(embed_dim=64, image_tower="resnet18", image_size=32,  # ResNet-18 at 1/4 width: 0.7M
                             image_tower_args=dict(channels=(16, 32, 64, 128), stem_width=16),
                             text_width=64, text_layers=2, text_heads=2, context_length=32),
    "clip_vit_b32": dict(embed_dim=512, image_tower="vit_base_patch32_clip_224"),
    "clip_vit_b16": dict(embed_dim=512, image_tower="vit_base_patch16_clip_224"),
    "clip_vit_l14": dict(embed_dim=768, image_tower="vit_large_patch14_clip_224", text_width=768, text_heads=12),
    "clip_rn50": dict(embed_dim=1024, image_tower="resnet50"),
}


register_variants(ClipConfig, CLIP, VARIANTS)
