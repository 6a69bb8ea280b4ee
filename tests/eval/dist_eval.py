"""The ranks of distributed evaluations with hand-built models (run by test_eval_distributed).

    torchrun --nproc_per_node 2 tests/eval/dist_eval.py JOBS.json

JOBS.json lists ``{"model": "projection" | "projection_itm", "args": [pipeline.evaluate's
arguments]}``; they run one after another in one process group (one start-up for all).
Each rank prints ``{"rank": r, "metrics": [[task metrics, ...] per job]}``.
"""

import json
import sys

import torch.distributed as dist

from eval_models import projection_encoder
from pipeline import evaluate
from train.gather import world

if __name__ == "__main__":
    jobs = json.loads(open(sys.argv[1]).read())
    try:
        metrics = []
        for job in jobs:
            encoder = projection_encoder(itm="reversed" if job["model"] == "projection_itm" else None)
            cfg, log_level = evaluate.parse_args(job["args"])
            metrics.append([r["metrics"] for r in evaluate.evaluate(cfg, log_level, encoder)])
        print(json.dumps({"rank": world()[0], "metrics": metrics}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
