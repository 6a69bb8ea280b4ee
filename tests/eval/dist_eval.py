"""One rank of a distributed evaluation with a hand-built model (run by test_eval_distributed).

    torchrun --nproc_per_node 2 tests/eval/dist_eval.py MODEL --config FILE [key=value ...]

MODEL is ``projection`` or ``projection_itm``; the rest are ``pipeline.evaluate``'s arguments.
"""

import json
import sys

import torch.distributed as dist

from eval_models import projection_encoder
from pipeline import evaluate
from train.gather import world

if __name__ == "__main__":
    model, *argv = sys.argv[1:]
    encoder = projection_encoder(itm="reversed" if model == "projection_itm" else None)
    try:
        cfg, log_level = evaluate.parse_args(argv)
        results = evaluate.evaluate(cfg, log_level, encoder)
        print(json.dumps({"rank": world()[0], "metrics": [r["metrics"] for r in results]}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
