"""slurm/train_clip.sh across 2 nodes x 1 task on CPU, and the evaluation it chains (afterok).

The training job's two ranks meet at the first node's address (n1 does not resolve: its
NodeAddr) and really run DeepSpeed over gloo; the evaluation job starts only when training
succeeded and writes its results into the run directory.
"""

from __future__ import annotations

import io
import json
import re
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
    assert state in ("COMPLETED", "PURGED"), eval_log[-4000:]
    results = list((run_dir / "eval").glob("*zeroshot_classification.json"))
    assert results, eval_log[-4000:]
    assert json.loads(results[0].read_text())["metrics"]["acc1"] > 0  # a number came out of the chained job
