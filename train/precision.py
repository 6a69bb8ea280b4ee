"""Mixed precision: bf16 is autocast over fp32 weights; losses run in fp32.

With ``run.dtype=bf16`` DeepSpeed runs the forward under ``torch.autocast`` (its ``torch_autocast``
section): matmuls and convolutions compute in bf16 while weights, gradients, their accumulation
over micro-batches, optimizer states and EMA copies stay fp32, as under torch AMP in open_clip and
the ALBEF/MoCo references. What autocast would also put in bf16 but must not be (the logits of a
contrastive loss over the global batch, their softmax and log-sum-exp) runs under
:func:`full_precision`.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def _fp32(value):
    """bf16/fp16 tensors in fp32; fp32 and fp64 (the equality tests) as they are."""
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16) else value


def full_precision(fn: F) -> F:
    """``fn`` with autocast off on its tensors' device and its half-precision tensor arguments in fp32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with torch.autocast(device.type, enabled=False):
            return fn(*map(_fp32, args), **{k: _fp32(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
