"""The attention masks reach scaled_dot_product_attention in the form its fast CUDA kernels take,
and the results equal the old formulations (a float causal mask; a boolean padding mask).

No GPU here: kernel selection itself is not observable on CPU, so these tests check the
arguments SDPA receives (flash needs ``attn_mask=None``; it accepts ``is_causal=True``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.registry import MODELS
from train.tokenizers import build as build_tokenizer

CAPTIONS = ["a photo of a sneaker", "a bag", "a small grayscale picture of a coat", "pants"]


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[dict]:
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append({"mask": attn_mask, "is_causal": is_causal, "dtype": q.dtype})
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def build(name: str):
    torch.manual_seed(0)
    builder = MODELS.get(name)
    return builder(builder.Config())


def test_clip_text_tower_is_causal_without_a_mask_and_equals_the_float_mask(sdpa_calls):
    model = build("clip_tiny")  # training mode: nn.TransformerEncoderLayer's eval fast path skips SDPA
    tokens = build_tokenizer(model.contract)(CAPTIONS)
    ours = model.encode_text(**tokens)
    assert len(sdpa_calls) == 2 and all(c["mask"] is None and c["is_causal"] for c in sdpa_calls)

    text = model.text  # the old formulation: the additive float causal mask in every block
    length = tokens["input_ids"].shape[1]
    x = text.token_embedding(tokens["input_ids"]) + text.positional_embedding[:length]
    for block in text.blocks:
        x = block(x, src_mask=text.causal_mask[:length, :length])
    assert sdpa_calls[-1]["mask"] is not None and not sdpa_calls[-1]["is_causal"]
    last = tokens["attention_mask"].sum(1) - 1
    old = model.text_projection(text.ln_final(x)[torch.arange(len(CAPTIONS)), last])
    torch.testing.assert_close(ours, old, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_albef_padding_mask_is_an_additive_bias_in_the_compute_dtype_and_equals_the_boolean(sdpa_calls, dtype):
    model = build("albef_tiny").to(dtype)
    tokens = build_tokenizer(model.contract)(CAPTIONS)
    images = torch.randn(4, 3, 32, 32, dtype=dtype)
    image_tokens = model.image_tokens(images)
    sdpa_calls.clear()
    ours = model.fuse(model.text_tokens(**tokens), tokens["attention_mask"], image_tokens)
    self_attention = [c for c in sdpa_calls if c["mask"] is not None]
    assert len(self_attention) == 2 and all(c["mask"].dtype == dtype == c["dtype"] for c in self_attention)

    boolean = tokens["attention_mask"].bool()[:, None, None, :]  # the old mask
    x = model.embeddings(tokens["input_ids"])
    for layer in model.text_layers:
        x = layer(x, boolean)
    for layer in model.fusion_layers:
        x = layer(x, boolean, image_tokens)
    real = tokens["attention_mask"].bool()
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours[real], x[real], **tolerance)


def test_albef_text_with_no_real_token_stays_finite():
    model = build("albef_tiny")
    ids = torch.zeros(1, 5, dtype=torch.long)
    assert torch.isfinite(model.text_tokens(ids, torch.zeros_like(ids))).all()
