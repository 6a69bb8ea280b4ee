"""The CLIP loss: dense and chunked forms agree, and 2 ranks equal one process on the global batch."""

import json

import pytest
import torch

from train.objectives.clip import ChunkedLogSumExp, clip_loss


def _grads(image, text, log_scale, chunk):
    image, text, log_scale = (t.clone().requires_grad_(True) for t in (image, text, log_scale))
    loss = clip_loss(image, text, log_scale, chunk)
    loss.backward()
    return [loss.detach(), image.grad, text.grad, log_scale.grad]


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_loss_equals_dense(chunk):
    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(37, 16, generator=g), dim=1)
    log_scale = torch.tensor([2.5])
    for dense, chunked in zip(_grads(image, text, log_scale, 0), _grads(image, text, log_scale, chunk)):
        torch.testing.assert_close(chunked, dense, atol=1e-5, rtol=1e-5)


def test_chunked_logsumexp_gradcheck():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, s: ChunkedLogSumExp.apply(q, k, s, 2), (q, k, scale))


BACKWARDS = ("all_reduce", "reduce_scatter")  # gloo's path, NCCL's path (on gloo)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, torchrun):
    """One 2-rank launch compares both backward paths in turn."""
    out = tmp_path_factory.mktemp("clip_loss")
    proc = torchrun(["tests/train/dist_clip_loss.py", str(out), ",".join(BACKWARDS)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backward", BACKWARDS)
def test_two_ranks_equal_single_process_on_global_batch(two_ranks, backward):
    result = json.loads((two_ranks / f"{backward}.json").read_text())
    for form in ("dense", "chunked", "dense_ids", "chunked_ids"):  # _ids: 5 captions per image, across ranks
        for key in ("loss", "grad_image", "grad_text", "grad_logit_scale"):
            assert result[form][key] < 1e-5, (form, key, result[form][key])
    assert result["dense_vs_chunked_loss"] < 1e-5
    assert abs(result["dense_ids"]["loss_value"] - result["dense"]["loss_value"]) > 1e-3  # the ids matter
    assert (result["reduce_scatter_calls"] > 0) == (backward == "reduce_scatter")
