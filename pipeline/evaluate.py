"""Evaluate a checkpoint: ``python -m pipeline.evaluate --checkpoint PATH --config configs/eval/NAME.yaml [key=value ...]``.

Also under ``torchrun --nproc_per_node N``: the ranks split the embedding work (gloo on
CPU, NCCL on GPU) and produce the same numbers as one process. Results go to
``RUN_DIR/eval/`` for a run directory, else to ``--output``; the JSON results are also
printed on stdout by rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

import torch.distributed as dist

from pipeline.core import config
from pipeline.core.log import setup_logging
from pipeline.core.errors import run_command
from pipeline.evaluation import EvalConfig, run
from train.encoder import Encoder
from train.gather import world
from train.parallel import init_distributed


def parse_args(argv: list[str] | None = None) -> tuple[EvalConfig, str]:
    """(config, log level) from ``--checkpoint PATH --config FILE [key=value ...]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="run dir, checkpoint dir or open_clip:MODEL[:WEIGHTS] (= checkpoint=...)")
    parser.add_argument("--output", help="output folder (default: RUN_DIR/eval)")
    parser.add_argument("--log-level", default="INFO")
    config.add_arguments(parser, default=config.CONFIG_ROOT / "eval" / "fashion_mnist.yaml")
    args = parser.parse_args(argv)
    return config.from_args(EvalConfig, args, extra={"checkpoint": args.checkpoint, "output": args.output}), args.log_level


def evaluate(cfg: EvalConfig, log_level: str = "INFO", encoder: Encoder | None = None) -> list[dict]:
    """Run ``cfg`` as this process's rank (joining torchrun's group, if any); the results on every rank."""
    cfg = dataclasses.replace(cfg, device=str(init_distributed(cfg.device).device))  # "cuda": this rank's GPU
    setup_logging(log_level, *world())
    return run(cfg, encoder)


def main(argv: list[str] | None = None) -> None:
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON (libraries print)
            results = evaluate(*parse_args(argv))
        if world()[0] == 0:
            print(json.dumps([{k: r[k] for k in ("model", "dataset", "task", "metrics")} for r in results], indent=2))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_command(main)
