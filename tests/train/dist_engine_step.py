"""Run under torchrun (2 ranks): one optimizer step through the real DeepSpeed engine equals the reference.

argv: OUT_PATH. For each objective and ZeRO stage (fp32) a fresh objective from seed 0 is wrapped by
``train.parallel.wrap`` (``deepspeed.initialize``), each rank steps on its half of the global batch
with SGD (no momentum, no weight decay: the update is ``-lr x gradient``, so any error in the
gradient shows in the update; Adam's first step would hide a scale), and the parameters after the
step (momentum copies included) are compared with the reference's. One launch covers every case:
process start-up is the cost.

- CLIP, SimCLR (global BatchNorm), MoCo (ViT): the reference is ONE process on the global batch,
  without DeepSpeed, computed before the process group exists (world size 1).
- ALBEF contrasts each rank's features against its own batch's momentum keys plus the queue (as
  the ALBEF reference does), so its loss is not the global-batch one by design; its reference is
  the data-parallel definition: each rank's plain autograd gradient, averaged over ranks by hand.

Rank 0 writes ``{"OBJECTIVE/zeroS": {"update_err", "update_max", "moved", "params", "loss_err"}, ...}``, plus,
from the same launch (and the CLIP ZeRO-2 engine), ``checkpoint``: when ``latest`` was written against when
the slow rank 1 finished its part of the save, and ``mem_rss``: the logged ``mem_rss_gb`` against each
rank's resident memory, rank 1 holding 256 MiB more than any other rank.
"""

import json
import os
import sys
import time

import psutil

import torch
import torch.distributed as dist

from train import checkpoint, metrics, optim, parallel
from train.config import LogConfig, OptimConfig, ParallelConfig, RunConfig
from train.registry import MODELS, OBJECTIVES
from train.tokenizers import build as build_tokenizer

GLOBAL_BATCH, LR = 4, 0.5
CAPTIONS = ["a photo of a sneaker", "a photo of a bag", "a small grayscale picture of a coat", "my new pants"]
TINY_VIT = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
# zero_init_last=False: no zero BatchNorm gain, so every weight gets a gradient
TINY_RESNET = dict(layers=[1, 1, 1, 1], channels=[8, 8, 16, 16], stem_width=8, zero_init_last=False)
CASES = {  # name: (model name, model overrides, objective overrides, ZeRO stages, reference)
    "clip": ("clip_tiny", {}, {}, (1, 2, 3), "one_process"),
    "simclr": ("ssl", dict(backbone="resnet18", backbone_args=TINY_RESNET, image_size=16, head_hidden_dim=16,
                           head_dim=8, sync_bn=True), {}, (1, 2, 3), "one_process"),
    "moco_v2": ("ssl", dict(backbone="vit_tiny_patch16_224", backbone_args=TINY_VIT, image_size=16, head_hidden_dim=16,
                            head_dim=8), dict(queue_size=8, momentum=0.9), (1, 2), "one_process"),
    "albef": ("albef_tiny", {}, dict(queue_size=8, momentum=0.9, alpha_rampup_epochs=0.0), (1, 2), "rank_mean"),
}


def build(name: str):
    model_name, model_args, objective_args, _, _ = CASES[name]
    torch.manual_seed(0)
    builder = MODELS.get(model_name)
    model = builder(builder.Config(**model_args))
    objective = OBJECTIVES.build(name, OBJECTIVES.get(name).Config(**objective_args), model)
    objective.start_step(0, 1)
    return objective


def global_batch(name: str, objective) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    size = objective.model.contract.image_size
    images = lambda: torch.randn(GLOBAL_BATCH, 3, size, size, generator=g)  # noqa: E731
    if name in ("simclr", "moco_v2"):
        return {"view1": images(), "view2": images()}
    batch = {"image": images(), **build_tokenizer(objective.model.contract)(CAPTIONS)}
    ids = torch.arange(GLOBAL_BATCH)  # one caption per image, as the loader gives without data.image_id_key
    return {**batch, "sample_id": ids, "image_id": ids}


def local(batch: dict, rank: int, world: int) -> dict:
    b = GLOBAL_BATCH // world
    return {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}


def sgd(objective) -> torch.optim.Optimizer:
    return optim.build_optimizer(objective, OptimConfig(name="sgd", lr=LR, momentum=0.0, weight_decay=0.0),
                                 torch.device("cpu"), objective.no_weight_decay())


def snapshot(objective) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(objective.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):  # whole tensors under ZeRO-3, a no-op otherwise
        return {n: p.detach().clone() for n, p in params.items()}


def plain_step(name: str, batch: dict, average_over_ranks: bool) -> tuple[dict, float]:
    """Parameters after one plain-autograd SGD step on ``batch`` (gradients averaged over ranks by hand if asked)."""
    objective = build(name)
    optimizer = sgd(objective)
    loss = objective(batch)["loss"]
    loss.backward()
    if average_over_ranks:
        for p in objective.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    optimizer.step()
    objective.end_step()
    return {n: p.detach().clone() for n, p in objective.named_parameters()}, float(loss)


def engine_step(name: str, batch: dict, stage: int, world: int) -> tuple[dict, float]:
    objective = build(name)
    # Threshold 0: under ZeRO-3 every parameter of these tiny models is partitioned, none kept whole.
    parallel_cfg = ParallelConfig(zero_stage=stage, stage3_param_persistence_threshold=0)
    ds_config = parallel.deepspeed_config(parallel_cfg, RunConfig(run_dir=".", steps=1), GLOBAL_BATCH // world, world)
    engine = parallel.wrap(objective, sgd(objective), ds_config, activation_checkpointing=False)
    loss = engine(batch)["loss"]
    engine.backward(loss)
    engine.step()
    objective.end_step()
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return snapshot(objective), float(loss) / world, engine


class SlowToSave:
    """Pickles (as 0) only after a while: rank 1's trainer state is the last part of the checkpoint."""

    def __reduce__(self):
        time.sleep(3.0)
        return int, (0,)


def save_with_a_slow_rank(engine, out_dir: str, rank: int) -> dict:
    """``latest``'s mtime against that of rank 1's trainer state, which rank 1 writes 3 s late."""
    folder = f"{out_dir}/checkpoints"
    saver = checkpoint.Checkpointer(folder, every=1, keep_last=3, rank=rank, cfg=RunConfig(run_dir=out_dir, steps=1))
    saver.save(engine, 1, {"slow": SlowToSave() if rank == 1 else 0})
    parallel.barrier()
    return {"latest": os.stat(f"{folder}/latest").st_mtime,
            "last_rank_state": os.stat(f"{folder}/{checkpoint.tag_for(1)}/trainer_rank1.pt").st_mtime}


def _rss_gb() -> float:
    return psutil.Process().memory_info().rss / 2**30


def logged_memory(out_dir: str, rank: int, world: int) -> dict:
    """The ``mem_rss_gb`` that one logging step records, with each rank's own resident memory then."""
    before = [None] * world
    dist.all_gather_object(before, _rss_gb())
    # rank 1 tops the largest rank by 256 MiB, whatever the earlier cases left on rank 0 (its reference steps)
    extra = max(before) - before[rank] + 0.25
    held = torch.ones(int(extra * 2**30) // 4) if rank == 1 else None  # written, so resident
    log = metrics.Metrics(LogConfig(tensorboard=False), out_dir, 1, rank, world, torch.device("cpu"), {})
    log.update({"loss": torch.tensor(1.0)}, 1, 0.0)
    record = log.log(1, 0, 0.1, {})
    rss = [None] * world
    dist.all_gather_object(rss, _rss_gb())
    log.close()
    del held
    return {"logged": record["mem_rss_gb"], "ranks": rss}


def main(out_path: str) -> None:
    one_process = {name: plain_step(name, global_batch(name, build(name)), average_over_ranks=False)
                   for name, case in CASES.items() if case[4] == "one_process"}  # before the process group: world 1
    env = parallel.init_distributed("cpu")
    initial = {name: {n: p.detach().clone() for n, p in build(name).named_parameters()} for name in CASES}
    result, kept = {}, None
    for name, (_, _, _, stages, reference) in CASES.items():
        batch = local(global_batch(name, build(name)), env.rank, env.world)
        expected, expected_loss = one_process[name] if reference == "one_process" else plain_step(name, batch, True)
        for stage in stages:
            params, loss, engine = engine_step(name, batch, stage, env.world)
            kept = engine if (name, stage) == ("clip", 2) else kept
            start = initial[name]
            update_err = max(float((params[n] - expected[n]).abs().max()) for n in start)
            update_max = max(float((expected[n] - start[n]).abs().max()) for n in start)
            moved = sum(not torch.equal(params[n], start[n]) for n in start)
            result[f"{name}/zero{stage}"] = dict(update_err=update_err, update_max=update_max, moved=moved,
                                                 params=len(start), loss_err=abs(loss - expected_loss))
    out_dir = os.path.dirname(out_path)
    result["checkpoint"] = save_with_a_slow_rank(kept, out_dir, env.rank)
    result["mem_rss"] = logged_memory(out_dir, env.rank, env.world)
    if env.rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    parallel.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
