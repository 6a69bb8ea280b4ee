"""End-to-end training on 2 real ranks (torchrun, gloo, real DeepSpeed) on real Fashion-MNIST shards.

One launch checks several things: the ZeRO-2 run is also the reference curve of the kill/resume
test, the ZeRO-3 run is also exported through ``load_encoder``.
"""

import json
import math
import shutil
import signal
import time

import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.encoder import load_encoder
from train.parallel import consolidated_state_dict, to_universal
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
    # ZeRO-1 keeps the last 2 of its 3 checkpoints (run.keep_last), the others the default 3.
    return cached_runs(tmp_path_factory, torchrun, lambda run_dir, stage: _args(
        fmnist_shards, run_dir, stage, *(["run.keep_last=2"] if stage == 1 else [])), "clip", timeout=600, together=(1, 2, 3))


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


def test_keep_last_keeps_the_newest_checkpoints(runs):
    checkpoints = runs(1) / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000008", "step_0000012"]
    assert (checkpoints / "latest").read_text() == "step_0000012"


@pytest.mark.parametrize("stage, spec, tag", [(3, "", "step_0000012"), (2, "checkpoints", "step_0000012"),
                                              (2, "checkpoints/step_0000008", "step_0000008")])
def test_checkpoint_exports_an_encoder_with_the_consolidated_weights(runs, stage, spec, tag):
    """A run dir, its checkpoints folder or one step_* folder, under ZeRO-3 or ZeRO-2: the encoder holds
    exactly that tag's weights, gathered from every rank's partition by DeepSpeed's zero_to_fp32."""
    encoder = load_encoder(str(runs(stage) / spec))
    reference = consolidated_state_dict(str(runs(stage) / "checkpoints"), tag)
    weights = {f"model.{k}": v for k, v in encoder.model.state_dict().items() if f"model.{k}" in reference}
    assert len(weights) == sum(k.startswith("model.") for k in reference)
    assert all(torch.equal(weights[k], reference[k]) for k in weights), tag
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


def test_stop_signal_to_one_rank_checkpoints_and_the_resume_matches_the_curve(runs, fmnist_shards, tmp_path,
                                                                              torchrun, torchrun_popen):
    """SIGUSR1 (Slurm's warning) to one rank and its DataLoader workers: both ranks stop after the same step
    with a checkpoint there (ckpt_every=0 saves none of its own), exit 75, and the resumed run continues the curve."""
    reference = _losses(runs(2))
    proc = torchrun_popen(_args(fmnist_shards, tmp_path, 2, "run.ckpt_every=0"))
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first record"
        time.sleep(0.02)
    rank = psutil.Process(proc.pid).children()[-1]
    for process in [rank, *rank.children()]:  # the workers inherit the handler and must ignore the signal
        process.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert "exitcode  : 75" in stderr, stderr[-4000:]
    stopped_at = max(_losses(tmp_path))
    assert stopped_at < STEPS, "the signal came too late to test anything"
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{stopped_at:07d}"

    resumed = torchrun(_args(fmnist_shards, tmp_path, 2, "run.resume=latest"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _losses(tmp_path) == reference  # bitwise, step for step


def test_two_rank_checkpoint_resumes_on_one_rank_with_model_and_optimizer_state(runs, fmnist_shards, tmp_path,
                                                                                torchrun):
    """The ZeRO-2 run's step-8 checkpoint (2 ranks) continues on 1 rank through DeepSpeed's universal form.
    One step at lr 0 leaves the fp32 weights as saved, and Adam's moments of that step follow from the saved
    ones: with g = (m9 - b1 m8) / (1 - b1), v9 == b2 v8 + (1 - b2) g^2, and the step count is 9."""
    saved = tmp_path / "two_ranks" / "checkpoints"
    shutil.copytree(runs(2) / "checkpoints" / "step_0000008", saved / "step_0000008")
    run_dir = tmp_path / "one_rank"
    proc = torchrun(_args(fmnist_shards, run_dir, 2, "run.steps=9", "optim.lr=0",
                          f"run.resume={saved / 'step_0000008'}"), nproc=1, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "this rank reads streams [0, 1, 2, 3]" in proc.stderr  # the data position of both ranks' streams
    assert sorted(_losses(run_dir)) == [9]
    before = saved / "step_0000008_universal" / "zero"
    after = run_dir / "checkpoints" / to_universal(str(run_dir / "checkpoints"), "step_0000009") / "zero"
    b1, b2 = 0.9, 0.98
    params = sorted(p.name for p in before.iterdir() if p.is_dir())  # one folder per parameter
    assert params and params == sorted(p.name for p in after.iterdir() if p.is_dir())
    for name in params:
        old, new = ({f: torch.load(d / name / f"{f}.pt", weights_only=False)
                     for f in ("fp32", "exp_avg", "exp_avg_sq", "step")} for d in (before, after))
        assert torch.equal(new["fp32"]["param"], old["fp32"]["param"]), name
        assert float(new["step"]) == float(old["step"]) + 1 == 9
        grad = (new["exp_avg"]["param"] - b1 * old["exp_avg"]["param"]) / (1 - b1)  # this step's gradient
        torch.testing.assert_close(new["exp_avg_sq"]["param"], b2 * old["exp_avg_sq"]["param"] + (1 - b2) * grad**2,
                                   rtol=1e-5, atol=0, msg=name)
