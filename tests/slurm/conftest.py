"""The ``slurm_cluster`` fixture: one real 2-node Slurm cluster shared by the tests here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/slurm_cluster.py, the harness
from slurm_cluster import SlurmCluster, SlurmUnavailable  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def slurm_cluster():
    """Two emulated nodes (n1, n2) on 127.0.0.1, each with 4 CPUs and 2 placeholder GPUs."""
    try:
        cluster = SlurmCluster(nodes=2, cpus=4, gpus=2).start()
    except SlurmUnavailable as err:
        pytest.skip(f"no Slurm here: {err}")
    yield cluster
    cluster.stop()


@pytest.fixture
def job_env():
    """What every submitted job gets: the project's venv, torch on loopback, one thread per rank."""
    return {
        "PYTHON": str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable,
        "VLPIPE_LOOPBACK": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
