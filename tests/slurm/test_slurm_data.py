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
        *(f"{n} tasks x dataset phase dedupe/{k}/{p}" for k in levels
          for n, p in [(1, "prepare")] * k.endswith(("pixel", "embedding")) + [(2, "map"), (1, "reduce"), (1, "merge")]),
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


# Cheap steps (no scorer, no embedder): still one dataset-wide step between two shard phases.
CHAIN_OVERRIDES = ["steps=[basic,dedupe]", "dedupe.levels=[rows,exact]", "input.part_size=30", "reshard.target_shard_size=40",
                   "reshard.workers_per_gpu=1", "download.processes=1", "download.threads=8"]


def squeue(cluster, job: int) -> str:
    """"STATE REASON" of a job as squeue shows it."""
    return subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T %r"], env=cluster.env, capture_output=True, text=True).stdout.strip()


def _wait_for(predicate, timeout: float, what: str, logs: Path) -> None:
    import time

    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}\n{job_logs(logs)}"
        time.sleep(0.5)


@pytest.mark.slow
def test_download_script_then_chain_links_wait_on_each_other_and_a_resubmit_resumes(slurm_cluster, job_env, tmp_path):
    """slurm/download.sh downloads every part and curates nothing; then build_shards.sh's chain: its
    order as Slurm holds it (each job afterok on the one before, from scontrol), a failed link
    holds back the rest (squeue: DependencyNeverSatisfied; array ends from Slurm's completion log),
    and re-submitting the same command finishes the build without redoing finished outputs."""
    logs, out = tmp_path / "logs", tmp_path / "slurm"
    logs.mkdir()
    with serve_pool(pool=pool_subset(clean=40, per_fault=1)) as server:
        urls = server.write_url_list(tmp_path / "urls.parquet")
        env = {**job_env, "INPUT": str(urls), "OUTPUT": str(out), "ARRAY_SIZE": "2", "SBATCH_OUTPUT": str(logs / "%x-%j.out")}
        # slurm/download.sh first: prepare, then one array of img2dataset tasks, no curation
        download = slurm_cluster.sbatch(REPO / "slurm" / "download.sh", "configs/data/default.yaml", *CHAIN_OVERRIDES,
                                        env=env, cwd=REPO, timeout=120).check()
        (array, what), = re.findall(r"job (\d+): (.*)", download.output)
        parts = json.loads((out / "input" / "index.json").read_text())["parts"]
        assert what == f"2 tasks x shard phase of download ({parts} input parts)" and parts >= 2, download.output
        _wait_for(lambda: len(slurm_cluster.completed_states(int(array))) == 2, 400, "the download array's 2 tasks", logs)
        assert set(slurm_cluster.completed_states(int(array)).values()) == {"COMPLETED"}, job_logs(logs)
        assert all((out / "download" / f"{p:06d}_stats.json").exists() for p in range(parts)) and not (out / "steps").exists()
        downloaded = {p: p.stat().st_mtime_ns for p in (out / "download").iterdir()}

        # then the curation chain, as the same build_shards.sh command (its download stage finds every part done)
        driver = slurm_cluster.sbatch(REPO / "slurm" / "build_shards.sh", "configs/data/default.yaml", *CHAIN_OVERRIDES,
                                      env=env, cwd=REPO, timeout=120).check()
        chain = [int(job) for job in re.findall(r"job (\d+): ", driver.output)]
        # [download,basic,dedupe] shard array, then each dataset phase of dedupe and reshard: 13 links
        assert len(chain) == 13 and "job %d: 2 tasks x shard phase of download,basic,dedupe" % chain[0] in driver.output, driver.output
        subprocess.run(["scontrol", "hold", str(chain[1])], env=slurm_cluster.env, check=True)  # cancelled below: a failed link
        for before, job in zip(chain, chain[1:]):
            assert re.fullmatch(rf"afterok:{before}(_\*)?\(unfulfilled\)", slurm_cluster.dependency(job)), job
        _wait_for(lambda: len(slurm_cluster.completed_states(chain[0])) == 2, 400, "the first array's 2 tasks", logs)
        assert slurm_cluster.completed_states(chain[0]) == {f"{chain[0]}_0": "COMPLETED", f"{chain[0]}_1": "COMPLETED"}
        assert all((out / "steps" / "dedupe" / f"{p:06d}.parquet").exists() for p in range(parts))
        subprocess.run(["scancel", str(chain[1])], env=slurm_cluster.env, check=True)
        _wait_for(lambda: squeue(slurm_cluster, chain[2]) == "PENDING DependencyNeverSatisfied", 60, "the next link to be held back", logs)
        assert squeue(slurm_cluster, chain[3]) == "PENDING Dependency"  # and the one after it waits on that one
        assert not (out / "manifest.parquet").exists() and not (out / "steps" / "dedupe" / "decisions").exists()
        subprocess.run(["scancel", *map(str, chain[2:])], env=slurm_cluster.env, check=True)
        finished = downloaded
        finished.update({p: p.stat().st_mtime_ns for p in (out / "steps").rglob("*.parquet")})

        again = slurm_cluster.sbatch(REPO / "slurm" / "build_shards.sh", "configs/data/default.yaml", *CHAIN_OVERRIDES,
                                     env=env, cwd=REPO, timeout=120).check()
        last = int(re.search(r"last job: (\d+)", again.output).group(1))
        assert slurm_cluster.wait_job(last, timeout=400) == "COMPLETED", job_logs(logs)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] > 0 and stats["input_rows"] == json.loads((out / "input" / "index.json").read_text())["rows"]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished, "a finished output was written again"

