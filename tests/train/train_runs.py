"""Helpers of the tests that launch the trainer: runs shared within a module, a rank killed mid-run,
a run loaded in a fresh process that must not import DeepSpeed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

# Loads a run in a fresh process and fails if that imported DeepSpeed; saves an image embedding.
LOAD_WITHOUT_DEEPSPEED = """
import sys, torch
from PIL import Image
from train.encoder import load_encoder
encoder = load_encoder(sys.argv[1])
assert "deepspeed" not in sys.modules, "loading the run imported deepspeed"
torch.save(encoder.embed_images(encoder.preprocess(Image.new("RGB", (28, 28), 128))[None]), sys.argv[2])
"""


def embed_without_deepspeed(run_dir: Path, tmp_path: Path) -> torch.Tensor:
    """(1, D) embedding of a grey image by ``run_dir``'s encoder, loaded in a process that never imports DeepSpeed."""
    out = tmp_path / "embedding.pt"
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DEEPSPEED, str(run_dir), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    return torch.load(out, weights_only=True)


def cached_runs(tmp_path_factory, torchrun, args_of, name: str, timeout: float):
    """``get(stage) -> run dir`` of an uninterrupted run of ``args_of(run_dir, stage)``, launched once per stage."""
    done = {}

    def get(stage):
        if stage not in done:
            run_dir = tmp_path_factory.mktemp(f"{name}_zero{stage}")
            proc = torchrun(args_of(run_dir, stage), timeout=timeout)
            assert proc.returncode == 0, proc.stderr[-4000:]
            done[stage] = run_dir
        return done[stage]

    return get


def kill_one_rank_at_checkpoint(run_dir: Path, proc: subprocess.Popen, tag: str, timeout: float) -> None:
    """SIGKILL one rank of a torchrun launch once ``run_dir``'s latest checkpoint is ``tag``."""
    latest, deadline = run_dir / "checkpoints" / "latest", time.time() + timeout
    while not (latest.exists() and latest.read_text() == tag):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the checkpoint"
        time.sleep(0.02)
    os.kill(psutil.Process(proc.pid).children()[-1].pid, signal.SIGKILL)
