"""Loader claims on real tar shards: resampled sources drawn by weight, bad samples skipped and counted
by reason, DataLoader workers that persist across epochs."""

from __future__ import annotations

import itertools
import json

import psutil
import torch
import webdataset as wds

from conftest import write_fmnist_shards
from train.config import DataConfig, SourceConfig
from train.contract import DataContract
from train.data import TrainLoader, sample_id

CONTRACT = DataContract(image_size=32, context_length=16)


def test_resampled_sources_are_drawn_in_proportion_to_their_weights(tmp_path):
    # Two samples per shard, so a few hundred samples are a few hundred draws of a source.
    light = write_fmnist_shards(tmp_path / "light", count=32, shards=16)  # fmnist000000..31, weight 1
    heavy = write_fmnist_shards(tmp_path / "heavy", count=64, shards=32)
    sizes = json.loads((heavy / "sizes.json").read_text())
    for name in sorted(sizes)[:16]:  # keep fmnist000032..63 only: no key in both sources
        (heavy / name).unlink()
        del sizes[name]
    (heavy / "sizes.json").write_text(json.dumps(sizes))
    cfg = DataConfig(path=str(light), sources=[SourceConfig(path=str(heavy), weight=3.0)], resampled=True,
                     batch_size=16, workers=0, shuffle_buffer=1, num_samples=1024, text=False)
    loader = TrainLoader(cfg, CONTRACT, rank=0, world=1, seed=0)
    ids = torch.cat([batch["sample_id"] for batch in itertools.islice(iter(loader), 60)]).tolist()  # 480 draws
    heavy_ids = {sample_id(f"fmnist{i:06d}") for i in range(32, 64)}
    light_ids = {sample_id(f"fmnist{i:06d}") for i in range(32)}
    assert set(ids) <= heavy_ids | light_ids
    fraction = sum(i in heavy_ids for i in ids) / len(ids)
    assert abs(fraction - 0.75) < 0.06, fraction  # weight 3 of 4; one standard deviation is 0.02


def test_corrupt_and_incomplete_samples_are_skipped_and_counted_by_reason(tmp_path):
    shard_dir = write_fmnist_shards(tmp_path / "data", count=64, shards=2)
    shard = shard_dir / "shards" / "000000.tar"
    members = list(wds.tariterators.tar_file_iterator(open(shard, "rb")))
    image = next(m["data"] for m in members if m["fname"].endswith(".jpg"))
    planted = {"corrupt_image": 3, "missing_image": 2, "missing_caption": 1}
    with wds.TarWriter(str(shard)) as sink:  # the planted samples first, then the shard's own
        for i in range(3):
            sink.write({"__key__": f"corrupt{i}", "jpg": b"\xff\xd8 not a jpeg", "txt": "a photo"})
        for i in range(2):
            sink.write({"__key__": f"noimage{i}", "txt": "a photo", "json": "{}"})
        sink.write({"__key__": "nocaption0", "jpg": image})
        for key, group in itertools.groupby(members, key=lambda m: m["fname"].split(".")[0]):
            sink.write({"__key__": key, **{m["fname"].split(".", 1)[1]: m["data"] for m in group}})
    cfg = DataConfig(path=str(shard_dir), batch_size=8, workers=0, shuffle_buffer=1)
    loader = TrainLoader(cfg, CONTRACT, rank=0, world=1, seed=0)
    ids = torch.cat([b["sample_id"] for b in itertools.islice(iter(loader), loader.batches_per_epoch)]).tolist()
    assert {reason: count for reason, count in loader.skipped().items() if count} == planted
    good = {sample_id(f"fmnist{i:06d}") for i in range(64)}
    assert set(ids) <= good and len(set(ids)) == len(ids) == loader.batches_per_epoch * 8


def test_dataloader_workers_persist_across_epochs(tmp_path):
    shard_dir = write_fmnist_shards(tmp_path / "data", count=256, shards=4)
    cfg = DataConfig(path=str(shard_dir), batch_size=32, workers=2, shuffle_buffer=1, text=False)
    loader = TrainLoader(cfg, CONTRACT, rank=0, world=1, seed=0)
    me = psutil.Process()
    others = {p.pid for p in me.children()}  # the session's servers and clusters started by earlier tests
    stream, workers = iter(loader), []
    for epoch in range(3):
        for _ in range(loader.batches_per_epoch):
            next(stream)
            assert loader.epoch == epoch
        workers.append({p.pid for p in me.children()} - others)
    first_batch_of_epoch_3 = next(stream)["sample_id"]
    assert loader.epoch == 3 and len(first_batch_of_epoch_3) == 32
    assert len(workers[0]) == 2 and workers[0] == workers[1] == workers[2], workers  # forked once
    assert {p.pid for p in me.children()} - others == workers[0]
