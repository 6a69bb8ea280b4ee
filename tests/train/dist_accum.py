"""Run under torchrun (1 or 2 ranks): one step at micro-batch b with grad_accum k vs one at b x k.

argv: OUT_DIR NAMES (comma-separated clip, simclr: one launch runs each in turn). Both engines start from the same weights and take one SGD step
(lr 1, so the update is the gradient) on the same samples; rank 0 writes ``accum_{NAME}_{WORLD}.json``
with the losses and the largest weight difference. SimCLR uses a ViT backbone: BatchNorm statistics
per micro-batch would differ from those of the whole batch, so no cache could be exact there.
"""

import json
import sys

import torch

from pipeline.core import config
from train import parallel
from train.config import TrainConfig
from train.loop import accumulate, accumulate_features
from train.registry import MODELS, OBJECTIVES

B, K = 4, 3
CONFIGS = {
    "clip": ("configs/clip/tiny.yaml", []),
    "simclr": ("configs/simclr/tiny.yaml", ["model.backbone=vit_tiny_patch16_224", "model.sync_bn=false",
                                            "model.backbone_args={img_size: 32, patch_size: 8, depth: 2, "
                                            "embed_dim: 32, num_heads: 2}"]),
}


def batches(name: str, rank: int, contract) -> list[dict]:
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for i in range(K):
        size = contract.image_size
        if name == "clip":
            out.append({"image": torch.randn(B, 3, size, size, generator=g),
                        "input_ids": torch.randint(1, 400, (B, contract.context_length), generator=g),
                        "attention_mask": torch.ones(B, contract.context_length, dtype=torch.long),
                        "image_id": torch.arange(B) + (rank * K + i) * B})  # every pair its own image
        else:
            out.append({f"view{v}": torch.randn(B, 3, size, size, generator=g) for v in (1, 2)})
    return out


def build(cfg: TrainConfig):
    torch.manual_seed(0)
    return OBJECTIVES.build(cfg.objective.name, cfg.objective, MODELS.build(cfg.model.name, cfg.model))


def step(cfg: TrainConfig, micro_batches: list[dict], world: int, accumulate_fn):
    objective = build(cfg)
    optimizer = torch.optim.SGD(objective.parameters(), lr=1.0)
    micro_batch = next(iter(micro_batches[0].values())).shape[0]
    parallel_cfg = cfg.parallel.__class__(zero_stage=1, grad_accum=len(micro_batches))
    engine = parallel.wrap(objective, optimizer, parallel.deepspeed_config(parallel_cfg, cfg.run, micro_batch, world),
                           activation_checkpointing=False)
    outs = accumulate_fn(engine, objective, micro_batches)
    return outs[-1]["loss"].item(), {n: p.detach().clone() for n, p in objective.named_parameters()}


def run(out_dir: str, name: str, env: parallel.DistEnv) -> None:
    path, overrides = CONFIGS[name]
    cfg = config.load(TrainConfig, path, ["run.run_dir=unused", *overrides])
    objective = build(cfg)
    initial = {n: p.detach().clone() for n, p in objective.named_parameters()}
    micro = batches(name, env.rank, objective.model.contract)
    whole = [{key: torch.cat([m[key] for m in micro]) for key in micro[0]}]
    cached_loss, cached = step(cfg, micro, env.world, accumulate_features)
    whole_loss, reference = step(cfg, whole, env.world, accumulate)
    plain_loss, plain = step(cfg, micro, env.world, accumulate)
    diff = lambda a, b: max((a[n] - b[n]).abs().max().item() for n in a)  # noqa: E731
    if env.rank == 0:
        with open(f"{out_dir}/accum_{name}_{env.world}.json", "w") as f:
            json.dump({"cached_loss": cached_loss, "whole_loss": whole_loss, "plain_loss": plain_loss,
                       "cached_vs_whole": diff(cached, reference), "plain_vs_whole": diff(plain, reference),
                       "update": diff(reference, initial)}, f)


def main(out_dir: str, names: list[str]) -> None:
    env = parallel.init_distributed("cpu")
    for name in names:
        run(out_dir, name, env)
    parallel.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
