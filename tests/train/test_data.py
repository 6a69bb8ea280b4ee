"""The training loader on real tar shards: exact mid-epoch resume, counted skips, guard rails."""

import functools
import http.server
import itertools
import shutil
import threading

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from train.config import DataConfig
from train.contract import DataContract
from train.data import ShardStream, TrainLoader
from train.transforms import TRANSFORMS, to_model_input

CONTRACT = DataContract(image_size=32, context_length=16)


def _loader(path, workers=2, rank=0, world=1, **kw):
    cfg = DataConfig(path=str(path), batch_size=16, workers=workers, shuffle_buffer=64, **kw)
    return TrainLoader(cfg, CONTRACT, rank=rank, world=world, seed=3)


def _rest_of_epoch(loader, stream) -> list[int]:
    """Sample ids of ``stream`` until ``loader`` moves to the next epoch."""
    epoch, ids = loader.epoch, []
    while True:
        batch = next(stream)
        if loader.epoch != epoch:
            return ids
        ids += batch["sample_id"].tolist()


def _interrupted(loaders, batches) -> tuple[list[int], list[dict]]:
    """The ids each loader read in its first ``batches`` batches, and the loaders' states then."""
    ids = []
    for loader in loaders:
        stream = iter(loader)
        ids += [i for _ in range(batches) for i in next(stream)["sample_id"].tolist()]
    return ids, [loader.state_dict() for loader in loaders]


@pytest.mark.parametrize("before, after", [((2, 2), (1, 0)), ((1, 2), (2, 0))], ids=["2to1", "1to2"])
def test_resume_on_another_world_size_reads_every_sample_of_the_epoch_once(fmnist_shards, before, after):
    """(ranks, workers) before and after: 2 ranks x 2 workers -> 1 rank reading all 4 streams in-process,
    and 1 rank x 2 workers -> 2 ranks; across the interruption the epoch reads exactly the samples of an
    uninterrupted run, none twice more and none skipped."""
    (world, workers), (new_world, new_workers) = before, after
    epoch = []
    for rank in range(world):
        loader = _loader(fmnist_shards, workers, rank, world)
        epoch += _rest_of_epoch(loader, iter(loader))
    read, states = _interrupted([_loader(fmnist_shards, workers, r, world) for r in range(world)], batches=5)
    for rank in range(new_world):
        loader = _loader(fmnist_shards, new_workers, rank, new_world)
        loader.load_remapped(states)
        read += _rest_of_epoch(loader, iter(loader))
        assert loader.epoch == 1
    # The same multiset as the uninterrupted epoch. (Not a permutation of the shards even then: a stream's
    # shuffle buffer already holds samples of its next pass when the epoch's last batch is drawn.)
    assert sorted(read) == sorted(epoch)


def test_resume_that_cannot_share_the_streams_says_so_and_starts_the_next_epoch(fmnist_shards, caplog):
    _, states = _interrupted([_loader(fmnist_shards, workers=0)], batches=3)  # 1 stream
    loader = _loader(fmnist_shards, 0, rank=1, world=2)
    loader.load_remapped(states)
    assert "cannot be shared evenly by 2 ranks: the rest of epoch 0 is skipped" in caplog.text
    assert loader.epoch == 1
    fresh = _loader(fmnist_shards, 0, rank=1, world=2)
    fresh.epoch = 1
    assert torch.equal(next(iter(loader))["sample_id"], next(iter(fresh))["sample_id"])


@pytest.fixture(scope="module")
def truncated_shards(fmnist_shards, tmp_path_factory):
    """A copy of fmnist_shards whose shard 000003 is cut in the middle of a member."""
    out = tmp_path_factory.mktemp("truncated")
    shutil.copytree(fmnist_shards, out, dirs_exist_ok=True)
    shard = out / "shards" / "000003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    return out


def test_batches_have_the_contract_shapes(fmnist_shards):
    batch = next(iter(_loader(fmnist_shards, workers=0)))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.uint8  # normalised on the device
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (16, 16)
    assert batch["sample_id"].dtype == torch.int64 and len(set(batch["sample_id"].tolist())) == 16


def test_resume_mid_epoch_replays_the_same_batches(truncated_shards):
    loader = _loader(truncated_shards)
    stream = iter(loader)
    for _ in range(loader.batches_per_epoch + 5):  # into the second epoch, odd position
        next(stream)
    state = loader.state_dict()
    expected = [next(stream) for _ in range(loader.batches_per_epoch)]  # on into the third epoch
    resumed = _loader(truncated_shards)
    resumed.load_state_dict(state)
    got_all = list(itertools.islice(iter(resumed), len(expected)))
    assert len(got_all) == len(expected)
    for want, got in zip(expected, got_all):
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), key
    assert resumed.skipped() == loader.skipped()


def test_truncated_shard_is_skipped_and_counted(truncated_shards):
    loader = _loader(truncated_shards)
    stream = iter(loader)
    ids = torch.cat([next(stream)["sample_id"] for _ in range(loader.batches_per_epoch)])
    assert loader.skipped()["truncated_tar"] == 1
    assert len(ids) == loader.batches_per_epoch * 16  # fixed batches per epoch despite the loss
    next(stream)  # and the next epoch starts normally
    assert loader.epoch == 1


def test_too_few_shards_for_ranks_and_workers_is_an_error(fmnist_shards):
    cfg = DataConfig(path=str(fmnist_shards), batch_size=4, workers=2)
    with pytest.raises(ValueError, match="8 shards cannot feed 8 ranks x 2 workers"):
        ShardStream(cfg, CONTRACT, rank=0, world=8, seed=0)
    ShardStream(DataConfig(path=str(fmnist_shards), batch_size=4, workers=2, resampled=True), CONTRACT, 0, 8, 0)



@pytest.mark.parametrize("name", ["clip_train", "simclr", "moco_v2"])
def test_uint8_from_workers_normalised_on_the_device_equals_the_old_fp32_bit_for_bit(name):
    """The workers used to end in ToDtype(float32, scale=True) + Normalize per sample; those two
    steps (no randomness) now run batched after the copy: the values must not change at all."""
    cfg = DataConfig(path="unused", transform=name)
    transform = TRANSFORMS.build(name, cfg, CONTRACT)
    torch.manual_seed(0)
    images = [Image.effect_noise((40, 36), 60 + 10 * i).convert("RGB") for i in range(3)]
    samples = [transform(image) for image in images]
    old_tail = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(CONTRACT.mean, CONTRACT.std)])
    for key in samples[0]:
        uint8 = torch.stack([s[key] for s in samples])
        assert uint8.dtype == torch.uint8 and uint8.shape == (3, 3, 32, 32)
        old = torch.stack([old_tail(s[key]) for s in samples])
        assert torch.equal(to_model_input({key: uint8}, CONTRACT, torch.float32)[key], old)
        bf16 = to_model_input({key: uint8}, CONTRACT, torch.bfloat16, channels_last=True)[key]
        assert torch.equal(bf16, old.to(torch.bfloat16))  # what to_device's cast made of the old fp32
        assert bf16.is_contiguous(memory_format=torch.channels_last)
    ids = torch.arange(3)
    assert to_model_input({"sample_id": ids}, CONTRACT, torch.bfloat16)["sample_id"] is ids


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_shards_over_http_give_the_batches_of_local_shards(fmnist_shards):
    """``data.path=http://127.0.0.1:PORT/...{000000..000007}.tar`` (a real HTTP server on loopback, as an
    object store or CDN serves shards): the same batches, bit for bit, as the same pattern on disk."""
    handler = functools.partial(_QuietHandler, directory=str(fmnist_shards))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        pattern = "shards/{000000..000007}.tar"
        remote = _loader(f"http://127.0.0.1:{server.server_address[1]}/{pattern}", num_samples=1024)
        local = _loader(f"{fmnist_shards}/{pattern}", num_samples=1024)
        for want, got in itertools.islice(zip(iter(local), iter(remote)), 6):
            assert want.keys() == got.keys()
            for key in want:
                assert torch.equal(want[key], got[key]), key
        server.shutdown()
