"""Run under torchrun (2 ranks): LARS through the real DeepSpeed engine with ZeRO disabled (stage 0).

argv: OUT_DIR MODE. MODE "train" (2 ranks): in fp32, then in bf16 (DeepSpeed's autocast), each rank
trains a small MLP on its half of a fixed global batch; rank 0 writes ``lars_{fp32,bf16}.json``: per
step the loss, the largest gap between the parameters' step and LARS's formula applied to the
gradient the engine reduced, and the same gap for plain momentum SGD (no trust ratio); for the first
step also the gap between that gradient and the full-batch gradient of one process; and whether the
checkpoint's consolidated weights equal the parameters.
MODE "resume" (1 process): loads the fp32 checkpoint and writes ``resume.json``.
"""

import json
import sys

import torch
from torch import nn

from train import parallel
from train.checkpoint import read_weights, write_weights
from train.config import OptimConfig, ParallelConfig, RunConfig
from train.optim import build_optimizer

STEPS, LOCAL_BATCH = 20, 16
OPTIM = OptimConfig(name="lars", lr=0.5, weight_decay=1e-4, momentum=0.9, trust_coefficient=0.02)


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, batch):
        return {"loss": nn.functional.mse_loss(self.model(batch["x"]).float(), batch["y"])}


def lars_step(p, grad, velocity, weight_decay, trust_ratio=True):
    """The new velocity, which is the step LARS takes for ``p`` (SimCLR's form: lr inside the velocity)."""
    update = grad
    if p.ndim > 1:
        update = grad + weight_decay * p
        if trust_ratio:
            update = OPTIM.trust_coefficient * p.norm() / update.norm() * update
    return OPTIM.momentum * velocity + OPTIM.lr * update


def engine_for(objective: nn.Module, dtype: str, world: int, out_dir: str):
    optimizer = build_optimizer(objective, OPTIM, torch.device("cpu"))
    run = RunConfig(run_dir=out_dir, steps=STEPS, dtype=dtype)
    ds_config = parallel.deepspeed_config(ParallelConfig(zero_stage=0), run, LOCAL_BATCH, world)
    return parallel.wrap(objective, optimizer, ds_config, activation_checkpointing=False), optimizer


def train(out_dir: str, dtype: str, rank: int, world: int) -> None:
    torch.manual_seed(0)  # same weights and global batch on every rank
    objective = Regression()
    x = torch.randn(LOCAL_BATCH * world, 8)
    global_batch = {"x": x, "y": (x[:, :1] * 2 - x[:, 1:2]).sin()}
    local = {k: v[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH] for k, v in global_batch.items()}
    engine, optimizer = engine_for(objective, dtype, world, out_dir)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = list(objective.parameters())
    velocities = {id(p): torch.zeros_like(p) for p in params}
    sgd_velocities = {id(p): torch.zeros_like(p) for p in params}
    reference = Regression()
    reference.load_state_dict(objective.state_dict())
    nn.functional.mse_loss(reference.model(global_batch["x"]), global_batch["y"]).backward()
    losses, lars_gap, sgd_gap, grad_gap = [], [], [], None
    for step in range(STEPS):
        loss = engine(local)["loss"]  # under bf16, DeepSpeed's autocast over the fp32 weights
        engine.backward(loss)
        before = {id(p): (p.detach().clone(), p.grad.detach().clone()) for p in params}  # the reduced gradient
        if grad_gap is None:
            grad_gap = max(float((p.grad - r.grad).abs().max()) for p, r in zip(params, reference.parameters()))
        engine.step()
        gaps, sgd_gaps = [], []
        for p in params:
            w, grad = before[id(p)]
            step_lars = velocities[id(p)] = lars_step(w, grad, velocities[id(p)], decay[id(p)])
            step_sgd = sgd_velocities[id(p)] = lars_step(w, grad, sgd_velocities[id(p)], decay[id(p)], False)
            gaps.append(float((w - p.detach() - step_lars).abs().max() / step_lars.abs().max()))
            sgd_gaps.append(float((w - p.detach() - step_sgd).abs().max() / step_sgd.abs().max()))
        lars_gap.append(max(gaps))
        sgd_gap.append(max(sgd_gaps))
        losses.append(float(loss.detach()))
    tag = f"last_{dtype}"
    engine.save_checkpoint(out_dir, tag=tag, save_latest=False)
    parallel.barrier()
    if rank == 0:
        write_weights(out_dir, tag)
        saved = read_weights(out_dir, tag)
        weights_match = sorted(saved) == sorted(n for n, _ in objective.named_parameters()) and all(
            torch.equal(saved[name], p.detach()) for name, p in objective.named_parameters())
        torch.save({id_: v for id_, v in enumerate(optimizer.state[p]["momentum"] for p in params)},
                   f"{out_dir}/velocity_{dtype}.pt")
        with open(f"{out_dir}/lars_{dtype}.json", "w") as f:
            json.dump({"loss": losses, "lars_gap": lars_gap, "sgd_gap": sgd_gap, "grad_gap": grad_gap,
                       "weights_match": weights_match}, f)


def resume(out_dir: str) -> None:
    """One process loads the 2-rank checkpoint: whole weights and LARS's momentum, no universal conversion."""
    objective = Regression()
    engine, optimizer = engine_for(objective, "fp32", 1, out_dir)
    engine.load_checkpoint(out_dir, tag="last_fp32", load_optimizer_states=True, load_lr_scheduler_states=False)
    saved, velocity = read_weights(out_dir, "last_fp32"), torch.load(f"{out_dir}/velocity_fp32.pt")
    params = list(objective.parameters())
    with open(f"{out_dir}/resume.json", "w") as f:
        json.dump({"weights": all(torch.equal(saved[n], p.detach()) for n, p in objective.named_parameters()),
                   "velocity": all(torch.equal(optimizer.state[p]["momentum"], velocity[i])
                                   for i, p in enumerate(params)),
                   "partitioned": parallel.partitioned(out_dir, "last_fp32")}, f)


def main(out_dir: str, mode: str) -> None:
    env = parallel.init_distributed("cpu")
    if mode == "resume":
        resume(out_dir)
    else:
        for dtype in ("fp32", "bf16"):
            train(out_dir, dtype, env.rank, env.world)
    parallel.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
