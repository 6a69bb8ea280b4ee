"""Train a model: ``torchrun --nproc_per_node N -m train.main --config configs/clip/tiny.yaml [key=value ...]``.

The same command runs as a single process (``python -m train.main ...``) and under
``srun`` (one task per device; see ``slurm/train_clip.sh``).
"""

from __future__ import annotations

import argparse

from pipeline.core import config
from pipeline.core.errors import run_command
from train.config import TrainConfig
from train.loop import Trainer

REQUEUE_EXIT = 75  # stopped on SIGTERM/SIGUSR1 after a checkpoint: slurm/train.sh requeues the job (EX_TEMPFAIL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.main", description=__doc__.splitlines()[0])
    config.add_arguments(parser)
    cfg = config.from_args(TrainConfig, parser.parse_args(argv))  # config errors raise before any process group
    trainer = Trainer(cfg)
    try:
        finished = trainer.train()
    finally:
        trainer.close()
    return 0 if finished else REQUEUE_EXIT


if __name__ == "__main__":
    run_command(main)
