"""End-to-end training on 2 real ranks (torchrun, gloo, real DeepSpeed) on real Fashion-MNIST shards.

One launch checks several things: the ZeRO-2 run is also the reference curve of the kill/resume
test, the ZeRO-3 run is also exported through ``load_encoder``.
"""

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.encoder import load_encoder
from train.parallel import consolidated_state_dict
from conftest import write_fmnist_shards
from train_runs import cached_runs, embed_without_deepspeed, kill_one_rank_at_checkpoint

pytestmark = pytest.mark.slow
STEPS = 12


def _args(shards, run_dir, stage, *extra):
    # ZeRO-2 (also the kill/resume reference) reads with 2 DataLoader workers, the others in-process.
    workers = 2 if stage == 2 else 0
    return ["-m", "train.main", "--config", "configs/clip/tiny.yaml", f"data.path={shards}", f"run.run_dir={run_dir}",
            f"run.steps={STEPS}", "run.log_every=1", "run.ckpt_every=4", f"data.workers={workers}", "data.batch_size=32",
            "schedule.warmup_steps=2", "optim.lr=2e-3", f"parallel=deepspeed/zero{stage}.yaml", "parallel.grad_clip=1.0", *extra]


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def runs(fmnist_shards, tmp_path_factory, torchrun):
    """Run dirs of uninterrupted ZeRO-1/2/3 runs, built lazily and kept for the module."""
    return cached_runs(tmp_path_factory, torchrun, lambda run_dir, stage: _args(fmnist_shards, run_dir, stage),
                       "clip", timeout=600)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_lowers_the_loss(runs, stage):
    losses = _losses(runs(stage))
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < first - 0.3 and last < math.log(64), losses  # below chance for a global batch of 64
    record = json.loads((runs(stage) / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("epoch", "lr", "samples_per_s", "data_wait_s", "mem_rss_gb", "logit_scale"):
        assert key in record
    assert (runs(stage) / "checkpoints" / "latest").read_text() == f"step_{STEPS:07d}"


def test_zero3_checkpoint_exports_an_encoder(runs):
    encoder = load_encoder(str(runs(3)))
    images = torch.stack([encoder.preprocess(Image.new("L", (28, 28), 128))] * 2)
    assert encoder.embed_images(images).shape == (2, 64)
    assert encoder.embed_texts(["a photo of a bag"]).shape == (1, 64)


def test_every_checkpoint_has_consolidated_weights_that_load_without_deepspeed(runs, tmp_path):
    checkpoints = runs(3) / "checkpoints"  # ZeRO-3: every rank holds a partition of every parameter
    tags = sorted(p.name for p in checkpoints.glob("step_*"))
    assert tags == ["step_0000004", "step_0000008", "step_0000012"]
    for tag in tags:
        weights, reference = load_file(checkpoints / tag / "model.safetensors"), consolidated_state_dict(str(checkpoints), tag)
        assert sorted(weights) == sorted(reference)
        assert all(torch.equal(weights[k], reference[k]) for k in weights), tag
    grey = Image.new("RGB", (28, 28), 128)
    encoder = load_encoder(str(runs(3)))
    assert torch.equal(embed_without_deepspeed(runs(3), tmp_path), encoder.embed_images(encoder.preprocess(grey)[None]))


def test_kill_one_rank_then_resume_matches_the_uninterrupted_curve(runs, fmnist_shards, tmp_path, torchrun,
                                                                   torchrun_popen):
    reference = _losses(runs(2))
    proc = torchrun_popen(_args(fmnist_shards, tmp_path, 2))
    kill_one_rank_at_checkpoint(tmp_path, proc, "step_0000004", timeout=600)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the killed run must fail"
    killed_at = max(_losses(tmp_path))
    assert killed_at < STEPS, "the kill came too late to test anything"

    resumed = torchrun(_args(fmnist_shards, tmp_path, 2, "run.resume=latest"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _losses(tmp_path) == reference  # bitwise, step for step


def test_corrupt_samples_on_one_rank_are_counted_and_the_run_finishes(tmp_path, torchrun):
    """Corrupt images and captionless samples in a shard only rank 1 reads: before the skip counters
    were a fixed vector, rank 0 reduced [samples] and rank 1 [samples, skipped_corrupt_image] at the
    first logging step, and the run hung there."""
    import io
    import itertools

    import webdataset as wds

    from train.data import SKIP_REASONS, SkipCounter, shard_order

    seed, batch, shards = 0, 8, 4
    shard_dir = write_fmnist_shards(tmp_path / "data", count=shards * 64, shards=shards)
    names = [str(shard_dir / "shards" / f"{i:06d}.tar") for i in range(shards)]
    # Rank 1's first shard of epoch 0 (the trainer's own order); planted members come first, so
    # every one of them is read before the epoch's last batch, which shuffle_buffer=1 keeps in order.
    planted_shard = next(shard_order(names, seed, 0, 1, 2, 0, 1, SkipCounter()))["url"]
    members = list(wds.tariterators.tar_file_iterator(open(planted_shard, "rb")))
    planted = {"corrupt_image": 3, "missing_caption": 2}
    with wds.TarWriter(planted_shard) as sink:
        for i in range(planted["corrupt_image"]):
            sink.write({"__key__": f"corrupt{i}", "jpg": b"\xff\xd8 not a jpeg", "txt": "a photo"})
        for i in range(planted["missing_caption"]):
            sink.write({"__key__": f"nocaption{i}", "jpg": members[0]["data"]})
        for key, group in itertools.groupby(members, key=lambda m: m["fname"].split(".")[0]):
            sink.write({"__key__": key, **{m["fname"].split(".", 1)[1]: m["data"] for m in group}})
    run_dir = tmp_path / "run"
    steps = shards * 64 // (2 * batch)  # one epoch: rank 1 reads all of its shards
    proc = torchrun(["-m", "train.main", "--config", "configs/clip/tiny.yaml", f"data.path={shard_dir}",
                     f"run.run_dir={run_dir}", f"run.steps={steps}", "run.log_every=3", "data.workers=0",
                     f"data.batch_size={batch}", "data.shuffle_buffer=1", "log.tensorboard=false", "schedule.warmup_steps=2",
                     f"run.seed={seed}"], timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9, 12, 15, 16]
    assert {reason: records[-1][f"skipped_{reason}"] for reason in SKIP_REASONS} == {
        reason: planted.get(reason, 0) for reason in SKIP_REASONS}
