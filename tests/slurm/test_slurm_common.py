"""slurm/common.sh: the Slurm -> distributed mapping, on a real 2-node cluster and with GPU-cluster values."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMON = REPO / "slurm" / "common.sh"


def _bash(snippet: str, env: dict[str, str]) -> str:
    script = f'set -euo pipefail; source "{COMMON}"; {snippet}'
    return subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.parametrize(
    "slurm_vars, expected",
    [
        ({"SLURM_GPUS_ON_NODE": "8"}, "8"),  # --gres=gpu:8
        ({"SLURM_GPUS_PER_NODE": "a100:8"}, "8"),  # --gpus-per-node=a100:8
        ({"SLURM_GPUS_PER_NODE": "gpu:h100:4"}, "4"),
        ({"SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"}, "8"),  # --gpus=8 on one node
        ({}, "0"),  # a CPU partition
    ],
)
def test_gpu_count_from_the_variables_a_gpu_cluster_sets(slurm_vars, expected):
    assert _bash("vlpipe_gpus_on_node", {"PYTHON": "/bin/false", **slurm_vars}) == expected


def test_gpu_cluster_runs_one_process_per_gpu():
    # 8 nodes x 8 GPUs as Slurm would present them; a stand-in interpreter reports 8 CUDA devices.
    env = {"PYTHON": "/bin/echo", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "8",
           "SLURM_NODEID": "3", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", "PATH": "/usr/bin:/bin"}
    fake_python = 'vlpipe_cuda_devices() { echo 8; }; scontrol() { echo localhost; }; '
    out = _bash(fake_python + 'vlpipe_dist_env 2>/dev/null; echo "$NPROC_PER_NODE $WORLD_SIZE $NODE_RANK $VLPIPE_DEVICE $MASTER_PORT"', env)
    assert out == "8 64 3 cuda 24242"


def test_placeholder_gpus_fall_back_to_cpu_across_two_nodes(slurm_cluster, job_env, tmp_path):
    """--gpus-per-node=2 on the local cluster: Slurm sets the GPU variables, CUDA has none, so the
    launcher runs one CPU rank per node; the ranks meet at the first node's NodeAddr."""
    script = tmp_path / "probe.sh"
    script.write_text(f'#!/bin/bash\nset -euo pipefail\nsource "{COMMON}"\n'
                      f'vlpipe_torchrun "{Path(__file__).parent / "dist_probe.py"}"\n')
    job = slurm_cluster.sbatch(script, options=("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=2"),
                               env=job_env, cwd=REPO, timeout=180).check()
    probes = [json.loads(line.split(" ", 1)[1]) for line in job.output.splitlines() if line.startswith("PROBE ")]
    assert "Slurm allocated 2 GPUs but CUDA sees fewer: running on CPU" in job.output
    assert sorted(p["RANK"] for p in probes) == ["0", "1"]
    assert {p["sum"] for p in probes} == {3.0}  # 1 + 2: both nodes took part in the all-reduce
    assert {p["MASTER_ADDR"] for p in probes} == {"127.0.0.1"}  # n1 does not resolve: its NodeAddr
    assert {p["GLOO_SOCKET_IFNAME"] for p in probes} == {"lo"}
