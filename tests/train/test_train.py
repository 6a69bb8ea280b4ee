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
from train_runs import cached_runs, embed_without_deepspeed, kill_one_rank_at_checkpoint

pytestmark = pytest.mark.slow
STEPS = 12


def _args(shards, run_dir, stage, *extra):
    # ZeRO-2 (also the kill/resume reference) reads with 2 DataLoader workers, the others in-process.
    workers = 2 if stage == 2 else 0
    return ["-m", "train.main", "--config", "configs/clip/tiny.yaml", f"data.path={shards}", f"run.run_dir={run_dir}",
            f"run.steps={STEPS}", "run.log_every=1", "run.ckpt_every=4", f"data.workers={workers}", "data.batch_size=32",
            "schedule.warmup_steps=2", "optim.lr=2e-3", f"parallel=deepspeed/zero{stage}.yaml", *extra]


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
