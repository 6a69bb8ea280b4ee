"""MoCo v2 on 2 gloo ranks (real torchrun): the queue after a step, the EMA key encoder, shuffle-BN.

Run as a script under torchrun, this file is the worker: one data-parallel step of MoCo on
a tiny ViT (no BatchNorm, so every key can be recomputed independently of its batch), then
shuffle-BN's key forward, repeated, on a tiny ResNet (BatchNorm) with the slices it normalised recorded.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from train.models.ssl import SSLEncoder
from train.objectives.moco import MoCo, shuffled_forward
from train.queue import FeatureQueue

WORLD, LOCAL_BATCH, QUEUE, MOMENTUM = 2, 2, 12, 0.9
SHUFFLES = 24  # a plain randperm puts one rank's own batch in one slice with probability 1/3 each time


def build() -> MoCo:
    torch.manual_seed(0)
    vit = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    model = SSLEncoder(
        SSLEncoder.Config(backbone="vit_tiny_patch16_224", backbone_args=vit, image_size=16, head_hidden_dim=16, head_dim=8)
    )
    return MoCo(MoCo.Config(temperature=0.2, momentum=MOMENTUM, queue_size=QUEUE), model)


def build_bn() -> SSLEncoder:
    torch.manual_seed(0)
    resnet = dict(layers=[1, 1, 1, 1], channels=[8, 8, 16, 16], stem_width=8)
    return SSLEncoder(SSLEncoder.Config(backbone="resnet18", backbone_args=resnet, image_size=16, head_hidden_dim=16,
                                        head_dim=8))


def shuffle_bn_worker(rank: int) -> dict:
    """Keys of this rank's images from ``SHUFFLES`` shuffled forwards, and the batch each forward normalised."""
    encoder = build_bn()
    images = torch.randn(LOCAL_BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(10 + rank))
    normalised = []
    encoder.register_forward_pre_hook(lambda module, args: normalised[-1].append(args[0].clone()))
    keys = []
    for _ in range(SHUFFLES):
        normalised.append([])
        keys.append(shuffled_forward(encoder, images))
    return {"bn_images": images, "bn_keys": keys, "bn_batches": [batch for (batch,) in normalised]}


def worker(out_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    moco = build()
    moco.check(global_batch=WORLD * LOCAL_BATCH, world_size=WORLD)
    optimizer = torch.optim.SGD(moco.model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1 + rank)  # different images on each rank
    batch = {f"view{i}": torch.randn(LOCAL_BATCH, 3, 16, 16, generator=generator) for i in (1, 2)}
    key_before = {n: p.clone() for n, p in moco.key_encoder["model"].named_parameters()}
    queue_before = moco.queue.get("key").clone()
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
            "queue_before": queue_before,
            "ptr": int(moco.queue.ptr),
            "key_before": key_before,
            "key_after": dict(moco.key_encoder["model"].named_parameters()),
            "query_after": dict(moco.model.named_parameters()),
            **shuffle_bn_worker(rank),
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
    for r in ranks:
        assert r["ptr"] == n
        for owner, produced in enumerate(ranks):  # slot owner's b rows hold the keys that rank produced
            rows = slice(owner * LOCAL_BATCH, (owner + 1) * LOCAL_BATCH)
            torch.testing.assert_close(r["queue"][rows], produced["expected_keys"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["queue"][n:], r["queue_before"][n:], atol=0, rtol=0)  # the rest untouched
        torch.testing.assert_close(r["queue_before"], ranks[0]["queue_before"], atol=0, rtol=0)
    assert not torch.allclose(ranks[0]["expected_keys"], ranks[1]["expected_keys"])
    assert not torch.allclose(ranks[0]["queue_before"][:n], ranks[0]["queue"][:n])  # the enqueue wrote


@pytest.mark.slow
def test_shuffle_bn_keys_never_share_their_queries_batch_statistics(ranks):
    """On a BatchNorm network: each key comes from a slice of the global batch that is not its query's
    batch (this rank's images), and equals that slice's train-mode forward, put back in order."""
    encoder = build_bn()  # the same weights; train mode: BatchNorm normalises with the batch's statistics
    with torch.no_grad():
        for r, own in enumerate(ranks):
            for call in range(SHUFFLES):
                for image, key in zip(own["bn_images"], own["bn_keys"][call]):
                    (slice_,) = [r2["bn_batches"][call] for r2 in ranks
                                 if any(torch.equal(image, x) for x in r2["bn_batches"][call])]
                    same_set = all(any(torch.equal(x, y) for y in own["bn_images"]) for x in slice_)
                    assert not same_set, f"call {call}: rank {r}'s key was normalised over its query's batch"
                    row = [i for i, x in enumerate(slice_) if torch.equal(image, x)][0]
                    torch.testing.assert_close(key, encoder(slice_)[row], atol=1e-5, rtol=1e-5)


def test_shuffle_bn_refuses_a_single_sample_per_rank():
    with pytest.raises(ValueError, match="shuffle_bn needs data.batch_size >= 2"):
        build().check(global_batch=2, world_size=2)


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
