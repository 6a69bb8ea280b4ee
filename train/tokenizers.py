"""Tokenizers by name: the contract's ``tokenizer`` picks one; each maps texts to padded ids.

Every tokenizer returns ``{"input_ids": (N, L) long, "attention_mask": (N, L) long}`` with
``L = contract.context_length``, so models and the data pipeline never branch on the source.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from pipeline.core.registry import Registry
from train.contract import DataContract

Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]
TOKENIZERS: Registry = Registry("tokenizer")


@TOKENIZERS.register("clip_bpe")
def clip_bpe(contract: DataContract) -> Tokenize:
    """CLIP's byte-level BPE (the vocabulary file ships inside the open_clip package)."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=contract.context_length)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        ids = tokenizer(texts)  # (N, L), 0-padded after <end_of_text>
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    return tokenize


@TOKENIZERS.register("hf")
def hugging_face(contract: DataContract) -> Tokenize:
    """Any Hugging Face tokenizer from a local directory (never the hub)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    if not contract.tokenizer_path:
        raise ValueError("the 'hf' tokenizer needs contract.tokenizer_path (a local model directory)")
    tokenizer = AutoTokenizer.from_pretrained(contract.tokenizer_path, local_files_only=True)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=contract.context_length,
                        return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"].long()}

    return tokenize


@TOKENIZERS.register("")
def image_only(contract: DataContract) -> Tokenize:
    """Image-only models (SimCLR, MoCo) have no text tower: tokenizing for them is an error."""

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        raise ValueError("this model is image-only (its contract has no tokenizer); it cannot encode text")

    return tokenize


def build(contract: DataContract) -> Tokenize:
    return TOKENIZERS.build(contract.tokenizer, contract)
