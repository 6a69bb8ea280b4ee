"""slurm/train_clip.sh across 2 nodes x 1 task on CPU, and the evaluation it chains (afterok).

The training job's two ranks meet at the first node's address (n1 does not resolve: its
NodeAddr) and really run DeepSpeed over gloo; the evaluation job starts only when training
succeeded and writes its results into the run directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.embedded import load_pool

REPO = Path(__file__).resolve().parents[2]


def write_pool_shards(out: Path, count: int = 256, shards: int = 4) -> Path:
    """``out/shards/*.tar`` + ``out/sizes.json`` (the curated-shards layout) from clean pool rows."""
    pool = load_pool(with_content=True).to_pandas()
    rows = pool[(pool["fault"] == "") & (pool["http"] == "ok")].head(count)
    (out / "shards").mkdir(parents=True)
    sizes = {}
    for shard in range(shards):
        name = f"shards/{shard:06d}.tar"
        part = rows.iloc[shard::shards]
        with wds.TarWriter(str(out / name)) as sink:
            for row in part.itertuples():
                sink.write({"__key__": f"{row.id:08d}", "jpg": row.content, "txt": row.caption})
        sizes[name] = len(part)
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


@pytest.mark.slow
def test_train_on_two_nodes_then_chained_eval(slurm_cluster, job_env, tmp_path):
    shards, run_dir = write_pool_shards(tmp_path / "data"), tmp_path / "run"
    env = {**job_env, "RUN_DIR": str(run_dir), "SBATCH_OUTPUT": str(tmp_path / "%x-%j.out"),
           "EVAL_ARGS": "configs/demo/eval.yaml dataset.limit=500"}
    train = slurm_cluster.sbatch(
        REPO / "slurm" / "train_clip.sh", "configs/clip/tiny.yaml", f"data.path={shards}", "run.steps=4",
        "run.ckpt_every=0", "schedule.warmup_steps=1", "data.batch_size=16", "data.workers=1", "log.tensorboard=false",
        options=("--nodes=2", "--ntasks-per-node=1"), env=env, cwd=REPO, timeout=600,
    ).check()
    assert "nodes=2 x procs=1 (cpu) world=2 master=127.0.0.1" in train.output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps[-1] == 4
    eval_job = int(re.search(r"submitted zero-shot evaluation: job (\d+)", train.output).group(1))
    state = slurm_cluster.wait_job(eval_job, timeout=600)
    eval_log = (tmp_path / f"eval-{eval_job}.out").read_text()
    assert state == "COMPLETED", eval_log[-4000:]  # Slurm's completion log, also once the job is purged
    results = list((run_dir / "eval").glob("*zeroshot_classification.json"))
    assert results, eval_log[-4000:]
    # The chained job evaluated this run: its numbers are what evaluating the run by hand gives.
    local = subprocess.run([job_env["PYTHON"], "-m", "pipeline.evaluate", "--checkpoint", str(run_dir), "--output", str(tmp_path / "by_hand"),
                            "--config", "configs/demo/eval.yaml", "dataset.limit=500", "device=cpu", "precision=fp32"],
                           cwd=REPO, env={**os.environ, **job_env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-4000:]
    by_hand = json.loads(next((tmp_path / "by_hand").glob("*zeroshot_classification.json")).read_text())["metrics"]
    chained = json.loads(results[0].read_text())["metrics"]
    assert chained.keys() == by_hand.keys() and chained == pytest.approx(by_hand, abs=1e-6, nan_ok=True)


@pytest.mark.slow
def test_a_failed_training_job_submits_no_evaluation(slurm_cluster, job_env, tmp_path):
    """afterok: the evaluation follows only a training job that succeeded; a failed one chains nothing."""
    before = set(subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_cluster.env, capture_output=True, text=True).stdout.split())
    train = slurm_cluster.sbatch(
        REPO / "slurm" / "train_clip.sh", "configs/clip/tiny.yaml", f"data.path={tmp_path / 'no_shards'}", "run.steps=2",
        "log.tensorboard=false", options=("--nodes=1",),
        env={**job_env, "RUN_DIR": str(tmp_path / "run"), "SBATCH_OUTPUT": str(tmp_path / "%x-%j.out")}, cwd=REPO, timeout=300)
    assert train.returncode != 0 and "training configs/clip/tiny.yaml" in train.output, train.output[-4000:]
    assert "submitted zero-shot evaluation" not in train.output, train.output[-4000:]
    queued = subprocess.run(["squeue", "-h", "-o", "%i %j"], env=slurm_cluster.env, capture_output=True, text=True).stdout
    assert not [line for line in queued.splitlines() if line.split()[0] not in before and line.split()[1] == "eval"], queued
    assert not list(tmp_path.glob("eval-*.out")), "an evaluation job ran"


@pytest.mark.slow
def test_train_albef_script_trains(slurm_cluster, job_env, tmp_path):
    """slurm/train_albef.sh submitted as a user would: ALBEF's default-config launcher runs the trainer."""
    shards, run_dir = write_pool_shards(tmp_path / "data", count=64), tmp_path / "run"
    train = slurm_cluster.sbatch(
        REPO / "slurm" / "train_albef.sh", "configs/albef/tiny.yaml", f"data.path={shards}", "run.steps=2", "run.log_every=1",
        "run.ckpt_every=0", "schedule.warmup_steps=1", "data.batch_size=8", "objective.queue_size=16", "log.tensorboard=false",
        options=("--nodes=1",), env={**job_env, "RUN_DIR": str(run_dir), "EVAL": "0"}, cwd=REPO, timeout=400).check()
    assert "training configs/albef/tiny.yaml" in train.output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records), train.output[-3000:]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _job_field(cluster, job_id: int, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", str(job_id)], env=cluster.env, capture_output=True, text=True)
    match = re.search(rf"\b{field}=(\S+)", shown.stdout)
    return match.group(1) if match else ""


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_warning_signal_checkpoints_requeues_and_continues_the_curve(slurm_cluster, job_env, tmp_path):
    """`--signal=B:USR1@300` as Slurm sends it (to the batch shell only): the trainer checkpoints after its
    step, the job requeues itself and resumes; the curve equals an uninterrupted run's, no step lost or repeated."""
    shards = write_pool_shards(tmp_path / "data")
    args = ["configs/clip/tiny.yaml", f"data.path={shards}", "run.steps=12", "run.log_every=2", "run.ckpt_every=0",
            "schedule.warmup_steps=1", "data.batch_size=16", "data.workers=1", "log.tensorboard=false"]
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    env = {**os.environ, **job_env, "PYTHONPATH": str(REPO)}
    reference = subprocess.run(  # the same world (2 ranks on one node), uninterrupted
        [job_env["PYTHON"], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.main",
         "--config", *args, f"run.run_dir={reference_dir}"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300)
    assert reference.returncode == 0, reference.stderr[-4000:]

    out = tmp_path / "job.out"
    job_id = int(subprocess.run(  # not --wait: that returns when the job is requeued
        ["sbatch", "--parsable", f"--output={out}", "--nodes=1", str(REPO / "slurm" / "train_clip.sh"), *args],
        env={**slurm_cluster.env, **job_env, "RUN_DIR": str(run_dir), "EVAL": "0", "CPU_PROCS_PER_NODE": "2"},
        cwd=REPO, capture_output=True, text=True, check=True).stdout.split(";")[0])
    try:
        _wait(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip(), 240,
              "the first record")
        subprocess.run(["scancel", "--batch", "--signal=USR1", str(job_id)], env=slurm_cluster.env, check=True)
        # Requeued: back to PENDING at once (`scontrol requeue` runs inside the batch script, which then
        # exits), and held for a while (its BeginTime, ~2 min). Shorten the hold, not to zero: started on a
        # node where the first run's batch script is still ending, Slurm kills it ("Job credential revoked").
        _wait(lambda: _job_field(slurm_cluster, job_id, "Restarts") == "1"
              and _job_field(slurm_cluster, job_id, "JobState") == "PENDING", 240, "the job to requeue itself")
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+15"], env=slurm_cluster.env,
                       check=True)
        state = slurm_cluster.wait_job(job_id, timeout=300)
        shown = subprocess.run(["scontrol", "show", "job", str(job_id)], env=slurm_cluster.env, capture_output=True,
                               text=True).stdout
    finally:
        subprocess.run(["scancel", str(job_id)], env=slurm_cluster.env)
    log = out.read_text(errors="replace")  # --open-mode=append: both runs of the job
    stopped = re.findall(r"stopped at step (\d+) of 12", log)
    assert state in ("COMPLETED", "PURGED") and len(stopped) == 2 and "requeueing job" in log, (
        log[-5000:] + shown + (slurm_cluster.root / "slurmctld.log").read_text(errors="replace")[-4000:])
    assert int(stopped[0]) < 12, "the signal came too late to test anything"
    assert f"resumed from {run_dir}/checkpoints/step_{int(stopped[0]):07d}" in log, log[-6000:]
    assert "saved checkpoint step_0000012" in log, log[-6000:]
    assert _losses(run_dir) == _losses(reference_dir)  # bitwise, step for step
