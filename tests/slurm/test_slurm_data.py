"""slurm/build_shards.sh on the local 2-node cluster gives what one local build_shards run gives.

A subset of the embedded pool (clean rows, a few of every planted fault, the originals of the
planted copies) is served on 127.0.0.1; the jobs run as processes of this machine, so they
reach it. The driver job prepares the list and submits 2-task arrays chained (afterok) with the
dataset-wide steps; a plain `python -m pipeline.build_shards` run over the same list runs
meanwhile. Both outputs must hold the same uids in the same shards, byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.embedded import load_pool
from pipeline.serve import serve_pool

REPO = Path(__file__).resolve().parents[2]
# Small parts so 4 parts split over 2 array tasks; the CLIP scorer's stored embeddings feed dedupe;
# decontamination (a shard-only step, like basic) is left out to keep within the time budget.
OVERRIDES = ["steps=[basic,clip_score,dedupe]", "input.part_size=30", "reshard.target_shard_size=40", "download.processes=1", "download.threads=8",
             "dedupe.embedding.embedder=clip_score"]
RESULT_FILES = ("manifest.parquet", "stats.json", "sizes.json", "reshard_plan.parquet")


def pool_subset(clean: int = 70, per_fault: int = 2):
    pool = load_pool(with_content=True)
    fault = pool["fault"].to_numpy(zero_copy_only=False)
    picked = set(np.flatnonzero(fault == "")[:clean])
    for kind in set(fault) - {""}:
        picked |= set(np.flatnonzero(fault == kind)[:per_fault])
    ids, dup_of = pool["id"].to_numpy(), pool["dup_of"].to_numpy()
    picked |= {int(np.flatnonzero(ids == d)[0]) for d in dup_of[sorted(picked)] if d >= 0}  # copies need their original
    return pool.take(sorted(picked))


def job_logs(folder: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(folder.glob("*.out")))


@pytest.mark.slow
def test_build_shards_chain_equals_a_local_run(slurm_cluster, job_env, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    with serve_pool(pool=pool_subset()) as server:
        urls = server.write_url_list(tmp_path / "urls.parquet")
        env = {**job_env, "INPUT": str(urls), "OUTPUT": str(tmp_path / "slurm"), "ARRAY_SIZE": "2",
               "SBATCH_OUTPUT": str(logs / "%x-%j.out")}
        driver = slurm_cluster.sbatch(REPO / "slurm" / "build_shards.sh", "configs/data/default.yaml", *OVERRIDES,
                                      env=env, cwd=REPO, timeout=120).check()
        local = subprocess.Popen(  # the reference, while the cluster works through the chain
            [job_env["PYTHON"], "-m", "pipeline.build_shards", "--input", str(urls), "--output", str(tmp_path / "local"),
             *OVERRIDES], cwd=REPO, env={**os.environ, **job_env}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        chain = [(int(job), what) for job, what in re.findall(r"job (\d+): (.*)", driver.output)]
        for job, what in chain:  # in order, so a failing link fails the test at once
            assert slurm_cluster.wait_job(job, timeout=240) in ("COMPLETED", "PURGED"), job_logs(logs)
        reference_log = local.communicate(timeout=240)[0]
    assert local.returncode == 0, reference_log[-4000:]
    levels = [f"{k}-{level}" for k, level in enumerate(["rows", "exact", "phash", "pixel", "embedding"])]
    assert [what for _, what in chain] == [  # every dataset-wide phase an array of its own (one job when once)
        "2 tasks x shard phase of download,basic,clip_score (4 input parts)",
        *(f"{n} tasks x dataset phase clip_score/{p}" for n, p in [(2, "histogram"), (1, "bin"), (2, "candidates"), (1, "cut"), (2, "decide")]),
        "2 tasks x shard phase of dedupe (4 input parts)",
        *(f"{n} tasks x dataset phase dedupe/{k}/{p}" for k in levels for n, p in [(2, "map"), (1, "reduce"), (1, "merge")]),
        "2 tasks x dataset phase dedupe/decide",
        *(f"{n} tasks x dataset phase reshard/{p}" for n, p in [(2, "survivors"), (1, "plan"), (2, "shards"), (2, "manifest"), (1, "finalize")]),
    ]
    task_logs = job_logs(logs)
    assert "task 0/2" in task_logs and "task 1/2" in task_logs and "dataset phase dedupe/2-phash/map, task 1/2" in task_logs

    slurm, local = tmp_path / "slurm", tmp_path / "local"
    assert (slurm / "manifest.parquet").exists(), job_logs(logs)
    for name in RESULT_FILES:
        if name.endswith(".json"):
            assert json.loads((slurm / name).read_text()) == json.loads((local / name).read_text()), name
        else:
            assert pq.read_table(slurm / name).equals(pq.read_table(local / name)), name
    shards = sorted(p.name for p in (local / "shards").glob("*.tar"))
    assert len(shards) >= 2 and shards == sorted(p.name for p in (slurm / "shards").glob("*.tar"))
    for name in shards:  # same uids, same order, same bytes
        assert (slurm / "shards" / name).read_bytes() == (local / "shards" / name).read_bytes(), name
    stats = json.loads((slurm / "stats.json").read_text())
    assert stats["kept"] > 0 and {"download", "basic", "clip_score", "dedupe"} <= set(stats["dropped"])
