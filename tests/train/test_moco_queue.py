"""MoCo v2 on 2 gloo ranks (real torchrun): the queue after a step, the EMA key encoder.

Run as a script under torchrun, this file is the worker: one data-parallel step of MoCo on
a tiny ViT (no BatchNorm, so every key can be recomputed independently of its batch).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from train.models.ssl import SSLEncoder
from train.objectives.moco import MoCo
from train.queue import FeatureQueue

WORLD, LOCAL_BATCH, QUEUE, MOMENTUM = 2, 2, 12, 0.9


def build() -> MoCo:
    torch.manual_seed(0)
    vit = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    model = SSLEncoder(
        SSLEncoder.Config(backbone="vit_tiny_patch16_224", backbone_args=vit, image_size=16, head_hidden_dim=16, head_dim=8)
    )
    return MoCo(MoCo.Config(temperature=0.2, momentum=MOMENTUM, queue_size=QUEUE), model)


def worker(out_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    moco = build()
    moco.check(global_batch=WORLD * LOCAL_BATCH, world_size=WORLD)
    optimizer = torch.optim.SGD(moco.model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1 + rank)  # different images on each rank
    batch = {f"view{i}": torch.randn(LOCAL_BATCH, 3, 16, 16, generator=generator) for i in (1, 2)}
    key_before = {n: p.clone() for n, p in moco.key_encoder["model"].named_parameters()}
    with torch.no_grad():
        expected_keys = F.normalize(moco.key_encoder["model"](batch["view2"]), dim=-1)  # (b, d)
    moco(batch)["loss"].backward()
    for p in moco.model.parameters():  # data parallelism: average gradients over ranks
        torch.distributed.all_reduce(p.grad)
        p.grad /= WORLD
    optimizer.step()
    moco.end_step()
    torch.save(
        {
            "batch": batch,
            "expected_keys": expected_keys,
            "queue": moco.queue.get("key").clone(),
            "ptr": int(moco.queue.ptr),
            "key_before": key_before,
            "key_after": dict(moco.key_encoder["model"].named_parameters()),
            "query_after": dict(moco.model.named_parameters()),
        },
        f"{out_dir}/rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, rank_outputs) -> list[dict]:
    return rank_outputs(__file__, tmp_path_factory.mktemp("moco"), nproc=WORLD)


@pytest.mark.slow
def test_queue_holds_keys_of_both_ranks_in_rank_order(ranks):
    n = WORLD * LOCAL_BATCH
    keys = torch.cat([r["expected_keys"] for r in ranks])  # (N, d)
    for r in ranks:
        assert r["ptr"] == n
        torch.testing.assert_close(r["queue"][:n], keys, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["queue"][n:], ranks[0]["queue"][n:])  # untouched initial keys, same on all ranks
    assert not torch.allclose(ranks[0]["expected_keys"], ranks[1]["expected_keys"])


@pytest.mark.slow
def test_key_encoder_follows_the_ema_of_the_query_encoder(ranks):
    for r in ranks:
        for name, key in r["key_after"].items():
            expected = MOMENTUM * r["key_before"][name] + (1 - MOMENTUM) * r["query_after"][name]
            torch.testing.assert_close(key, expected)
        moved = [n for n in r["key_after"] if not torch.equal(r["key_after"][n], r["key_before"][n])]
        assert moved, "the key encoder did not move"


def test_enqueue_wraps_the_ring_without_reading_the_pointer_on_the_host():
    queue = FeatureQueue(4, key=2)
    for step in range(3):
        queue.enqueue(key=torch.full((2, 2), float(step)))
    assert int(queue.ptr) == 2 and queue.get("key")[:, 0].tolist() == [2.0, 2.0, 1.0, 1.0]
    # On the meta device a host read (int(ptr), .item()) raises: enqueue must never need one.
    meta = FeatureQueue(4, key=2).to("meta")
    meta.enqueue(key=torch.empty(2, 2, device="meta"))


def test_queue_size_must_tile_the_global_batch():
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        build().check(global_batch=5, world_size=1)


if __name__ == "__main__":
    worker(sys.argv[1])
