"""Run under torchrun (2 ranks): drive CLIP's temperature into its bound under a ZeRO stage, then back.

argv: OUT_DIR STAGES (comma-separated: one launch runs each stage in turn). The loss is -logit_scale for UP steps (descent pushes it up, past the bound
if nothing stops the optimizer's copy), then +logit_scale. Rank 0 writes ``clamp{STAGE}.json`` per stage:
the optimizer's fp32 master value and the value forward saw, after every step.
"""

import json
import math
import sys

import torch
from torch import nn

from train import parallel
from train.config import ParallelConfig, RunConfig
from train.objectives.clip import CLIPObjective

UP, DOWN, MAX_SCALE = 12, 4, 100.0


class Driver(CLIPObjective):
    sign = -1.0

    def forward(self, batch):
        self.seen = float(self.logit_scale.detach().float().sum())
        return {"loss": self.sign * self.logit_scale.float().sum() + 0.0 * self.model.weight.sum()}


def run(out_dir: str, stage: int, rank: int, world: int) -> None:
    torch.manual_seed(0)
    objective = Driver(CLIPObjective.Config(max_logit_scale=MAX_SCALE), nn.Linear(2, 2))
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.5)  # no momentum: turns with the loss
    ds_config = parallel.deepspeed_config(ParallelConfig(zero_stage=stage), RunConfig(run_dir=out_dir, steps=1), 1, world)
    engine = parallel.wrap(objective, optimizer, ds_config, activation_checkpointing=False)
    from deepspeed.utils import safe_get_full_fp32_param

    master, seen = [], []
    for step in range(UP + DOWN):
        objective.sign = -1.0 if step < UP else 1.0
        engine.backward(engine({})["loss"])
        engine.step()
        objective.end_step()
        master.append(float(safe_get_full_fp32_param(objective.logit_scale).sum()))  # a collective: all ranks
        seen.append(objective.seen)
    if rank == 0:
        with open(f"{out_dir}/clamp{stage}.json", "w") as f:
            json.dump({"master": master, "seen": seen, "bound": math.log(MAX_SCALE), "up": UP}, f)


def main(out_dir: str, stages: list[int]) -> None:
    env = parallel.init_distributed("cpu")
    for stage in stages:
        run(out_dir, stage, env.rank, env.world)
    parallel.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], [int(stage) for stage in sys.argv[2].split(",")])
