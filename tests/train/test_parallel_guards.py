"""Guards in train/parallel.py that refuse a configuration before any damage."""

import pytest
import torch
from torch import nn

from pipeline.core.config import ConfigError
from train import parallel
from train.momentum import Momentum


class WithMomentum(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Linear(4, 4)
        self.key_encoder = Momentum(0.99, model=self.model)


def test_zero3_is_refused_for_momentum_encoders():
    module = WithMomentum()
    optimizer = torch.optim.AdamW(module.model.parameters())
    with pytest.raises(ConfigError, match=r"momentum encoders.*ZeRO-3.*zero2"):
        parallel.wrap(module, optimizer, {"zero_optimization": {"stage": 3}}, activation_checkpointing=False)


def test_ema_update_follows_the_formula():
    module = WithMomentum()
    before = module.key_encoder["model"].weight.clone()
    with torch.no_grad():
        module.model.weight.add_(1.0)
    module.key_encoder.update()
    expected = 0.99 * before + 0.01 * module.model.weight
    assert torch.allclose(module.key_encoder["model"].weight, expected)
    assert not any(p.requires_grad for p in module.key_encoder.parameters())
