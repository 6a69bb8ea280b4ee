"""CPC: 2 gloo ranks (real torchrun) against one process on the global batch, through the model.

Run as a script under torchrun, this file is the worker: each rank takes its slice of the same
seeded global batch of patch grids, and saves its loss and the gradients of every parameter of
the same seeded model, for the dense and the chunked (memory-bounded) InfoNCE.
"""

from __future__ import annotations

import sys

import pytest
import torch

from train.models.cpc import CPCModel
from train.objectives.cpc import CPC

WORLD, LOCAL_BATCH = 2, 2
CHUNKS = (0, 5)  # 5 leaves ragged blocks of the 4 * 18 predictions and 4 * 9 patches


def build(chunk: int) -> CPC:
    torch.manual_seed(0)
    model = CPCModel(CPCModel.Config(backbone="resnet18", image_size=16, patch_size=8, patch_stride=4,
                                     backbone_args={"layers": [1, 1, 1, 1], "channels": [4, 8, 8, 8], "stem_width": 4,
                                                    "zero_init_last": False},
                                     context_dim=16, context_layers=1, predict_rows=2))  # a 3 x 3 grid
    return CPC(CPC.Config(chunk_size=chunk), model).double()


def global_patches() -> torch.Tensor:
    return torch.randn(WORLD * LOCAL_BATCH, 9, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def losses(patches: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for chunk in CHUNKS:
        objective = build(chunk)
        loss = objective({"patches": patches})["loss"]
        loss.backward()
        out[chunk] = {"loss": loss.detach(), **{name: p.grad for name, p in objective.named_parameters()}}
    return out


def worker(out_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.save(losses(global_patches()[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]), f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, rank_outputs):
    return rank_outputs(__file__, tmp_path_factory.mktemp("cpc_loss"), nproc=WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", CHUNKS, ids=["dense", "chunked"])
def test_cpc_on_two_ranks_equals_single_process(ranks, chunk):
    single = losses(global_patches())[chunk]
    assert set(ranks[0][chunk]) == set(single)
    for name, value in single.items():
        # Data parallelism averages the ranks' losses and gradients.
        averaged = sum(r[chunk][name] for r in ranks) / WORLD
        torch.testing.assert_close(averaged, value, rtol=1e-7, atol=1e-10, msg=name)
    assert all(single[name].abs().sum() > 0 for name in single if name != "loss")  # every parameter learns


def test_dense_and_chunked_cpc_agree():
    dense, chunked = losses(global_patches()).values()
    for name in dense:
        torch.testing.assert_close(chunked[name], dense[name], rtol=1e-7, atol=1e-10, msg=name)


if __name__ == "__main__":
    worker(sys.argv[1])
