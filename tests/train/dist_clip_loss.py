"""Run under torchrun (2 ranks): CLIP loss and gradients vs one process on the global batch.

argv: OUT_DIR BACKWARDS (comma-separated all_reduce, reduce_scatter: one launch runs each in turn). Rank 0
writes ``{"dense": {...}, "chunked": {...}, "dense_ids": ..., "chunked_ids": ...}`` of max abs differences
to ``OUT_DIR/{backward}.json``; the ``_ids`` forms give 5 captions per image, image 1's pairs on both ranks.
With "reduce_scatter" the gather's backward takes its NCCL path (reduce-scatter), run here by gloo's own
reduce_scatter since NCCL needs GPUs; the calls are counted.
The single-process reference is computed before the process group exists, so the same
``clip_loss`` runs with world size 1 there and 2 afterwards.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

import train.gather
from train.objectives.clip import clip_loss

GLOBAL_BATCH, DIM, CHUNK = 16, 8, 3  # chunk 3 leaves ragged blocks on purpose
IMAGE_ID = torch.arange(GLOBAL_BATCH) // 5  # rank 0 holds pairs 0-7, rank 1 pairs 8-15
FORMS = {"dense": (0, False), "chunked": (CHUNK, False), "dense_ids": (0, True), "chunked_ids": (CHUNK, True)}


def inputs():
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=1)
    text = torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=1)
    return image, text, torch.tensor([2.0], dtype=torch.float64)


def loss_and_grads(image, text, log_scale, chunk, image_id=None):
    image, text, log_scale = (t.clone().requires_grad_(True) for t in (image, text, log_scale))
    loss = clip_loss(image, text, log_scale, chunk, image_id)
    loss.backward()
    return loss.detach(), image.grad, text.grad, log_scale.grad


def compare(reference: dict, rank: int, world: int) -> dict:
    image, text, log_scale = inputs()
    b = GLOBAL_BATCH // world
    local = slice(rank * b, (rank + 1) * b)
    result = {}
    for name, (chunk, ids) in FORMS.items():
        loss, d_image, d_text, d_scale = loss_and_grads(image[local], text[local], log_scale, chunk,
                                                        IMAGE_ID[local] if ids else None)
        # Data parallelism averages parameter gradients over ranks: do the same here.
        for t in (loss, d_scale):
            dist.all_reduce(t)
            t /= world
        d_image, d_text = d_image / world, d_text / world
        ref_loss, ref_image, ref_text, ref_scale = reference[name]
        diffs = torch.tensor([(loss - ref_loss).abs().max(), (d_image - ref_image[local]).abs().max(),
                              (d_text - ref_text[local]).abs().max(), (d_scale - ref_scale).abs().max()])
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        result[name] = dict(zip(["loss", "grad_image", "grad_text", "grad_logit_scale"], diffs.tolist()))
        result[name]["loss_value"] = loss.item()
    result["dense_vs_chunked_loss"] = abs(result["dense"]["loss_value"] - result["chunked"]["loss_value"])
    return result


def main(out_dir: str, backwards: list[str]) -> None:
    image, text, log_scale = inputs()
    reference = {name: loss_and_grads(image, text, log_scale, chunk, IMAGE_ID if ids else None)
                 for name, (chunk, ids) in FORMS.items()}
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    calls = []
    reduce_scatter = dist.reduce_scatter_single
    dist.reduce_scatter_single = lambda *args, **kwargs: calls.append(1) or reduce_scatter(*args, **kwargs)
    for backward in backwards:
        if backward == "reduce_scatter":
            train.gather.REDUCE_SCATTER_BACKENDS.add("gloo")
        else:
            train.gather.REDUCE_SCATTER_BACKENDS.discard("gloo")
        calls.clear()
        result = {**compare(reference, rank, world), "reduce_scatter_calls": len(calls)}
        if rank == 0:
            with open(f"{out_dir}/{backward}.json", "w") as f:
                json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2].split(","))
