"""Helpers of the tests that launch the trainer: runs shared within a module, a rank killed mid-run,
a run loaded in a fresh process that must not import DeepSpeed."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

DIST_RUNS = Path(__file__).with_name("dist_runs.py")  # several runs in one launch

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


def cached_runs(tmp_path_factory, torchrun, args_of, name: str, timeout: float, together=()):
    """``get(key) -> run dir`` of an uninterrupted run of ``args_of(run_dir, key)`` (``-m train.main ...``),
    launched once per key. The first ``get`` of any key in ``together`` runs all of them, in that order,
    in one launch (dist_runs.py), which pays the process start and imports once."""
    done = {}

    def get(key):
        if key not in done:
            keys = list(together) if key in together else [key]
            dirs = {k: tmp_path_factory.mktemp(re.sub(r"[^\w-]+", "_", f"{name}_{k}")) for k in keys}
            args = args_of(dirs[key], key)
            if len(keys) > 1:  # dist_runs.py takes what follows each "-m train.main", runs split by --next
                args = [str(DIST_RUNS), *itertools.chain.from_iterable(["--next", *args_of(d, k)[2:]] for k, d in dirs.items())]
            proc = torchrun(args, timeout=timeout * len(keys))
            assert proc.returncode == 0, proc.stderr[-4000:]
            done.update(dirs)
        return done[key]

    return get


def kill_one_rank_at_checkpoint(run_dir: Path, proc: subprocess.Popen, tag: str, timeout: float) -> None:
    """SIGKILL one rank of a torchrun launch once ``run_dir``'s latest checkpoint is ``tag``."""
    latest, deadline = run_dir / "checkpoints" / "latest", time.time() + timeout
    while not (latest.exists() and latest.read_text() == tag):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the checkpoint"
        time.sleep(0.02)
    os.kill(psutil.Process(proc.pid).children()[-1].pid, signal.SIGKILL)
