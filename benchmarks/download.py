"""Download throughput: this stage (pipeline.download) vs plain img2dataset, same URLs, same server.

The embedded pool's clean rows, repeated to ``--rows`` URLs, are served on 127.0.0.1 by one
server for both runs. Both use the same processes x threads, shard size, sha256 hashing and no
re-encoding (this stage's default.yaml setting); ours adds the list preparation (uids, checks,
input parts) and the moves into its layout, which is what the ratio measures.

    python -m benchmarks.download [--rows 4000] [--processes 2] [--threads 16] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.measure import stdout_to_stderr
from pipeline.core import config
from pipeline.download import DownloadCommand, download, extra_columns
from pipeline.embedded import load_pool
from pipeline.core.log import setup_logging
from pipeline.serve import serve_pool
from pipeline.core.shards import Layout
from pipeline.sources import prepare


def url_list(server, rows: int, path: str) -> str:
    table = server.url_table(extra_columns=())
    table = pa.concat_tables([table] * (rows // table.num_rows + 1)).slice(0, rows)
    pq.write_table(table, path)
    return path


def run_ours(urls: str, out: str, args) -> int:
    cfg = config.load(DownloadCommand, None, [f"input.part_size={args.shard_size}", f"download.processes={args.processes}",
                                                f"download.threads={args.threads}", "download.options.disable_all_reencoding=true"])
    layout = Layout(out)
    index = prepare(urls, cfg.input, layout)
    download(layout, range(index["parts"]), cfg.download, index["part_size"], extra_columns(layout))
    return sum(json.load(open(layout.download(p, "_stats.json")))["successes"] for p in range(index["parts"]))


def run_plain(urls: str, out: str, args) -> int:
    import img2dataset

    img2dataset.download(
        url_list=urls, output_folder=out, input_format="parquet", output_format="webdataset", url_col="url",
        caption_col="caption", number_sample_per_shard=args.shard_size, processes_count=args.processes,
        thread_count=args.threads, timeout=10, retries=0, compute_hash="sha256", disable_all_reencoding=True,
        enable_wandb=False,
    )
    return sum(json.load(open(os.path.join(out, f)))["successes"] for f in os.listdir(out) if f.endswith("_stats.json"))


def timed(fn, urls: str, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        ok = fn(urls, f"{out}/out", args)
        seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "successes": ok, "samples_per_s": round(ok / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs; the best of each counts")
    args = parser.parse_args()
    setup_logging("WARNING")
    pool = load_pool(with_content=True)
    clean = pool.filter(pc.and_(pc.equal(pool["fault"], ""), pc.equal(pool["http"], "ok")))
    runs = {"img2dataset": [], "ours": []}
    with serve_pool(pool=clean) as server, tempfile.TemporaryDirectory() as tmp, stdout_to_stderr():
        urls = url_list(server, args.rows, f"{tmp}/urls.parquet")
        for _ in range(args.repeats):
            runs["img2dataset"].append(timed(run_plain, urls, args))
            runs["ours"].append(timed(run_ours, urls, args))
    best = {name: max(r, key=lambda x: x["samples_per_s"]) for name, r in runs.items()}
    print(json.dumps({
        "rows": args.rows, "processes": args.processes, "threads": args.threads, "runs": runs, "best": best,
        "ours_vs_img2dataset": round(best["ours"]["samples_per_s"] / best["img2dataset"]["samples_per_s"], 3),
        "goal": "ours_vs_img2dataset >= 0.95", "loadavg": os.getloadavg(), "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
