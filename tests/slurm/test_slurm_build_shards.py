"""slurm/build_shards.sh on the local cluster: the driver submits an array job per shard phase,
chained with afterok to the dataset-wide steps; the chain ends with the curated shards.

img2dataset downloads from the embedded pool served on 127.0.0.1 by this test process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.embedded import load_pool
from pipeline.serve import serve_pool

REPO = Path(__file__).resolve().parents[2]
ROWS = 240  # -> 3 input parts of 80 rows -> array jobs of 2 tasks


@pytest.mark.slow
def test_build_shards_array_and_dependent_steps(slurm_cluster, job_env, tmp_path):
    pool = load_pool(with_content=True).slice(0, ROWS)
    out, logs = tmp_path / "curated", tmp_path / "logs"
    logs.mkdir()
    with serve_pool(pool=pool) as server:
        urls = server.write_url_list(tmp_path / "urls.parquet")
        env = {**job_env, "INPUT": str(urls), "OUTPUT": str(out), "ARRAY_SIZE": "2",
               "SBATCH_OUTPUT": str(logs / "%x-%j.out")}
        driver = slurm_cluster.sbatch(
            REPO / "slurm" / "build_shards.sh", "configs/data/default.yaml", "input.part_size=80",
            "download.processes=1", "dedupe.levels=[rows,exact,pixel]",
            env=env, cwd=REPO, timeout=300,
        ).check()
        last = int(re.search(r"last job: (\d+)", driver.output).group(1))
        state = slurm_cluster.wait_job(last, timeout=400)
    job_logs = {path.name: path.read_text(errors="replace") for path in logs.iterdir()}
    assert state in ("COMPLETED", "PURGED") and (out / "stats.json").exists(), "\n".join(
        f"== {name}\n{text[-1500:]}" for name, text in sorted(job_logs.items()))
    shard_tasks = [name for name in job_logs if name.startswith("build-shard-download")]
    assert len(shard_tasks) == 2, sorted(job_logs)  # the first group ran as a 2-task array
    assert any(name.startswith("build-dataset-") for name in job_logs)  # ... followed by dependent global steps

    stats = json.loads((out / "stats.json").read_text())
    sizes = json.loads((out / "sizes.json").read_text())
    manifest = pq.read_table(out / "manifest.parquet").to_pandas()
    assert stats["input_rows"] == ROWS == len(manifest)
    assert stats["kept"] == sum(sizes.values()) == int((manifest["shard"] >= 0).sum()) > 0
    assert all((out / name).exists() for name in sizes)
    planted_404 = int((pool.column("http").to_pandas() == "404").sum())
    assert stats["dropped"].get("download", {}).get("http_404", 0) == planted_404
