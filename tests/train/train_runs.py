"""Helpers of the tests that launch the trainer: runs shared within a module, a rank killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil


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
