"""Shared fixtures of the trainer tests (also used by the ALBEF, SimCLR/MoCo and eval tests)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.embedded import CLASSNAMES, fashion_mnist_test

REPO = Path(__file__).resolve().parents[2]


def write_fmnist_shards(out: Path, count: int, shards: int) -> Path:
    """``out/shards/{000000..}.tar`` of captioned Fashion-MNIST JPEGs plus ``out/sizes.json``."""
    images, labels = fashion_mnist_test()
    (out / "shards").mkdir(parents=True, exist_ok=True)
    sizes, per_shard = {}, count // shards
    for shard in range(shards):
        name = f"shards/{shard:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                jpeg = io.BytesIO()
                Image.fromarray(images[i]).convert("RGB").save(jpeg, format="JPEG", quality=90)
                caption = f"a photo of a {CLASSNAMES[labels[i]]}"
                sink.write({"__key__": f"fmnist{i:06d}", "jpg": jpeg.getvalue(), "txt": caption,
                            "json": json.dumps({"label": int(labels[i])})})
        sizes[name] = per_shard
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> Path:
    """A shard directory of 1024 captioned Fashion-MNIST test images ("a photo of a sneaker"), 8 shards."""
    return write_fmnist_shards(tmp_path_factory.mktemp("fmnist"), count=1024, shards=8)


def torchrun_command(args: list[str], nproc: int = 2) -> tuple[list[str], dict]:
    """``torchrun --standalone --nproc_per_node nproc ARGS`` (real processes, gloo) and its env."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args], env


@pytest.fixture(scope="session")
def torchrun():
    """``torchrun(args, nproc=2, timeout=240) -> CompletedProcess``, run from the repo root."""

    def run(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
        cmd, env = torchrun_command(args, nproc)
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def torchrun_popen():
    """``torchrun_popen(args, nproc=2) -> Popen`` (stdout discarded, stderr piped), for tests that kill ranks."""

    def start(args: list[str], nproc: int = 2) -> subprocess.Popen:
        cmd, env = torchrun_command(args, nproc)
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    return start


@pytest.fixture(scope="session")
def rank_outputs(torchrun):
    """``rank_outputs(script, out_dir, nproc=2) -> [rank 0's dict, ...]``: runs a test file as the worker
    under torchrun (its ``__main__`` takes ``out_dir`` and saves ``rank{r}.pt``) and loads what each rank saved."""

    def run(script: str, out_dir: Path, nproc: int = 2) -> list[dict]:
        proc = torchrun([script, str(out_dir)], nproc=nproc, timeout=120)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(nproc)]

    return run
