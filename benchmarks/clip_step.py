"""Full CLIP training step on CPU: ours (clip_vit_b32 + CLIP objective) vs open_clip's ViT-B-32.

One step = forward, loss, backward, AdamW step, fp32, batch 16 at 224 px, same images and
captions for both; steps alternate between the two models and the median per model counts.

    python -m benchmarks.clip_step [--batch 16] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def ours(batch: dict):
    from train.objectives.clip import CLIPObjective
    from train.optim import param_groups
    from train.registry import MODELS

    model = MODELS.build("clip_vit_b32", MODELS.get("clip_vit_b32").Config())
    objective = CLIPObjective(CLIPObjective.Config(), model)
    optimizer = torch.optim.AdamW(param_groups(objective, 0.2), lr=1e-4)

    def step():
        loss = objective(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.end_step()

    return step


def open_clip_step(batch: dict):
    import open_clip
    from open_clip.loss import ClipLoss

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2)

    def step():
        image, text, scale = model(batch["image"], batch["input_ids"])
        loss = loss_fn(image, text, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)

    return step


def make_batch(size: int) -> dict:
    from train.contract import DataContract
    from train.tokenizers import build

    g = torch.Generator().manual_seed(0)
    tokens = build(DataContract())([f"a photo of thing number {i}" for i in range(size)])
    return {"image": torch.randn(size, 3, 224, 224, generator=g), "image_id": torch.arange(size), **tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = make_batch(args.batch)
    steps = {"open_clip": open_clip_step(batch), "ours": ours(batch)}
    for step in steps.values():
        step()  # warm-up (allocator, lazy init)
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    print(json.dumps({"benchmark": "clip_step", "model": "ViT-B/32", "batch": args.batch, "image_size": 224,
                      "dtype": "fp32", "threads": args.threads, "samples_per_s": rate, "step_seconds": times,
                      "ratio_ours_vs_open_clip": rate["ours"] / rate["open_clip"]}, indent=2))


if __name__ == "__main__":
    main()
