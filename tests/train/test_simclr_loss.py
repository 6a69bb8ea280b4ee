"""NT-Xent and global BatchNorm: 2 gloo ranks (real torchrun) against one process on the global batch.

Run as a script under torchrun, this file is the worker: each rank takes its slice of the
same seeded global batch and saves its loss/output and the gradients of its slice.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from train.batchnorm import GlobalBatchNorm
from train.objectives.simclr import nt_xent

WORLD, LOCAL_BATCH, DIM, TEMPERATURE = 2, 3, 5, 0.3


def global_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    n = WORLD * LOCAL_BATCH
    return {
        "z1": torch.randn(n, DIM, generator=generator),
        "z2": torch.randn(n, DIM, generator=generator),
        "images": torch.randn(n, 4, 3, 3, generator=generator),  # BatchNorm input, C = 4
        "upstream": torch.randn(n, 4, 3, 3, generator=generator),  # a fixed gradient to pull back
    }


def losses(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss and BatchNorm output on ``inputs`` (a rank's slice, or the global batch)."""
    z1, z2 = (inputs[k].requires_grad_() for k in ("z1", "z2"))
    loss = nt_xent(F.normalize(z1, dim=-1), F.normalize(z2, dim=-1), TEMPERATURE)
    loss.backward()
    images = inputs["images"].requires_grad_()
    norm = GlobalBatchNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 4))
        norm.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    out = norm(images)
    (out * inputs["upstream"]).sum().backward()
    return {
        "loss": loss.detach(),
        "grad_z1": z1.grad,
        "grad_z2": z2.grad,
        "bn_out": out.detach(),
        "bn_grad_images": images.grad,
        "bn_grad_weight": norm.weight.grad,
        "bn_running_var": norm.running_var,
    }


def worker(out_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    local = {k: v[rows].clone() for k, v in global_inputs().items()}
    torch.save(losses(local), f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, rank_outputs) -> list[dict[str, torch.Tensor]]:
    return rank_outputs(__file__, tmp_path_factory.mktemp("nt_xent"), nproc=WORLD)


@pytest.mark.slow
def test_nt_xent_on_two_ranks_equals_single_process(ranks):
    single = losses(global_inputs())
    # Gradients are averaged over ranks by data parallelism, so the global loss is the mean.
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), single["loss"], atol=1e-6, rtol=1e-6)
    for name in ("grad_z1", "grad_z2"):
        gathered = torch.cat([r[name] for r in ranks]) / WORLD
        torch.testing.assert_close(gathered, single[name], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_global_batchnorm_on_two_ranks_equals_batchnorm_on_global_batch(ranks):
    single = losses(global_inputs())  # one process: GlobalBatchNorm is plain BatchNorm
    torch.testing.assert_close(torch.cat([r["bn_out"] for r in ranks]), single["bn_out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["bn_grad_images"] for r in ranks]), single["bn_grad_images"], atol=1e-5, rtol=1e-5)
    # Each rank's weight gradient covers its rows; their sum is the global one.
    torch.testing.assert_close(ranks[0]["bn_grad_weight"] + ranks[1]["bn_grad_weight"], single["bn_grad_weight"])
    for r in ranks:
        torch.testing.assert_close(r["bn_running_var"], single["bn_running_var"])


def test_nt_xent_hand_computed_batch_of_two():
    # Two images; views a1, a2 of image 1 and b1, b2 of image 2 on the unit circle.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # a1, b1
    z2 = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])  # a2, b2
    t = 0.5
    # Anchor a1: positive a2 (0.6); negatives b1 (0.0), b2 (-0.8); itself masked.
    # Anchor b1: positive b2 (0.6); negatives a1 (0.0), a2 (0.8).
    # Anchor a2: positive a1 (0.6); negatives b1 (0.8), b2 (-0.48 + 0.48 = 0.0).
    # Anchor b2: positive b1 (0.6); negatives a1 (-0.8), a2 (0.0).
    def term(pos, *neg):
        return -pos / t + math.log(sum(math.exp(s / t) for s in (pos, *neg)))

    expected = (term(0.6, 0.0, -0.8) + term(0.6, 0.0, 0.8) + term(0.6, 0.8, 0.0) + term(0.6, -0.8, 0.0)) / 4
    assert nt_xent(z1, z2, t).item() == pytest.approx(expected, rel=1e-6)


if __name__ == "__main__":
    worker(sys.argv[1])
