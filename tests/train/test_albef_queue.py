"""ALBEF's queues on 2 gloo ranks (real torchrun): identical on both ranks, filled in order, wrapping.

Run as a script under torchrun, this file is the worker: three data-parallel steps of the tiny
ALBEF with a queue that holds two global batches, so the third step wraps the pointer.
"""

from __future__ import annotations

import sys

import pytest
import torch

WORLD, LOCAL_BATCH, QUEUE, STEPS = 2, 2, 8, 3
CAPTIONS = ["a photo of a sneaker", "a photo of a bag", "a photo of a coat", "my new pants"]


def worker(out_dir: str) -> None:
    from train.registry import MODELS, OBJECTIVES
    from train.tokenizers import build as build_tokenizer

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)  # identical initial weights on both ranks
    builder = MODELS.get("albef_tiny")
    objective = OBJECTIVES.build("albef", OBJECTIVES.get("albef").Config(queue_size=QUEUE, momentum=0.9),
                                 builder(builder.Config()))
    objective.check(global_batch=WORLD * LOCAL_BATCH, world_size=WORLD)
    optimizer = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=0.1)
    tokens = build_tokenizer(objective.model.contract)(CAPTIONS[2 * rank: 2 * rank + LOCAL_BATCH])
    expected = []
    for step in range(STEPS):
        images = torch.randn(LOCAL_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(10 * step + rank))
        image_id = torch.arange(LOCAL_BATCH) + step * WORLD * LOCAL_BATCH + rank * LOCAL_BATCH
        teacher = objective.momentum["model"]
        with torch.no_grad():  # the keys this step must enqueue: this rank's momentum features
            expected.append({"image": teacher.encode_image(images), "id": image_id,
                             "text": teacher.encode_text(tokens["input_ids"], tokens["attention_mask"])})
        objective.start_step(step, steps_per_epoch=10)
        objective({"image": images, "image_id": image_id, **tokens})["loss"].backward()
        for p in objective.parameters():  # data parallelism: average gradients over ranks
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= WORLD
        optimizer.step()
        optimizer.zero_grad()
        objective.end_step()
    queue = {name: objective.queue.get(name).clone() for name in ("image", "text", "id")}
    torch.save({"queue": queue, "ptr": int(objective.queue.ptr), "expected": expected}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_queues_after_steps_on_two_ranks(tmp_path, rank_outputs):
    ranks = rank_outputs(__file__, tmp_path, nproc=WORLD)
    for name in ("image", "text", "id"):
        assert torch.equal(ranks[0]["queue"][name], ranks[1]["queue"][name]), name  # identical on both ranks
    global_batch = WORLD * LOCAL_BATCH
    assert ranks[0]["ptr"] == STEPS * global_batch % QUEUE == 4
    # Each step's keys, gathered in rank order; step 2 wrapped around onto step 0's slots.
    slots = {0: STEPS - 1, 1: STEPS - 2}  # queue half -> the step whose keys it holds
    for half, step in slots.items():
        for name in ("image", "text", "id"):
            gathered = torch.cat([ranks[r]["expected"][step][name] for r in range(WORLD)])
            held = ranks[0]["queue"][name][half * global_batch:(half + 1) * global_batch]
            torch.testing.assert_close(held, gathered, atol=1e-6, rtol=1e-6, msg=f"{name} of step {step}")


if __name__ == "__main__":
    worker(sys.argv[1])
