"""The training loader on real tar shards: exact mid-epoch resume, counted skips, guard rails."""

import itertools
import shutil

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from train.config import DataConfig
from train.contract import DataContract
from train.data import ShardStream, TrainLoader
from train.transforms import TRANSFORMS, to_model_input

CONTRACT = DataContract(image_size=32, context_length=16)


def _loader(path, workers=2, **kw):
    cfg = DataConfig(path=str(path), batch_size=16, workers=workers, shuffle_buffer=64, **kw)
    return TrainLoader(cfg, CONTRACT, rank=0, world=1, seed=3)


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
