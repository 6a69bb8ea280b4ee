"""``run.compile`` and ``run.channels_last``: a tiny ResNet with compiled blocks, fed NHWC images,
computes what the plain model computes on NCHW images (forward and gradients), on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from train.compile import compile_blocks
from train.registry import MODELS
from train.transforms import to_model_input

pytestmark = pytest.mark.slow  # inductor compiles C++ kernels on first use


def test_compiled_channels_last_model_equals_the_plain_one():
    torch.manual_seed(0)
    builder = MODELS.get("ssl")
    cfg = builder.Config(backbone="resnet18", image_size=32, head_hidden_dim=32, head_dim=16,
                         backbone_args=dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], stem_width=8))
    plain = builder(cfg)
    compiled = copy.deepcopy(plain)
    assert compile_blocks(compiled) == 4  # one BasicBlock per stage; stems and head stay eager
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    nchw = to_model_input({"image": images}, plain.contract, torch.float32)["image"]
    nhwc = to_model_input({"image": images}, plain.contract, torch.float32, channels_last=True)["image"]
    outputs = []
    for model, x in ((plain, nchw), (compiled, nhwc)):
        out = model(x)
        out.square().sum().backward()
        outputs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ours, ours_grads), (theirs, theirs_grads) = outputs[1], outputs[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, atol=1e-3, rtol=1e-3, msg=name)
