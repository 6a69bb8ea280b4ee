"""Step time and peak memory of our ALBEF step against the reference formulation, same batch.

The reference is a faithful re-run of salesforce/ALBEF's ``models/model_pretrain.py`` forward on
the same model and weights: momentum update inside forward, ITM negatives drawn per sample with
``torch.multinomial(...).item()`` in a Python loop from the local batch, and the MLM vocabulary
head over every token of student and teacher. Ours: vectorised Gumbel-max draw, vocabulary head
on the masked tokens only. Each side runs in its own fresh process (peak memory is per process);
both run forward, backward and an AdamW step.

    python -m benchmarks.albef_step [--model albef_tiny] [--batch 16] [--steps 10] [--device cpu]

Prints one JSON object: per side the median step time and the peak memory above the process's
memory after building the model (RSS on CPU, allocator peak on CUDA), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

import torch
import torch.nn.functional as F


def reference_forward(objective, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """ALBEF's ``forward`` (ITC, ITM with the per-sample sampling loop, full-sequence MLM)."""
    from train.objectives.albef import mask_tokens, soft_cross_entropy

    model, teacher, alpha = objective.model, objective.momentum["model"], objective.alpha
    images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    temp = objective.temperature.clamp(*objective.cfg.temperature_range)
    image_embeds, text_embeds = model.image_tokens(images), model.text_tokens(ids, mask)
    image_feat, text_feat = model.image_embedding(image_embeds), model.text_embedding(text_embeds)
    with torch.no_grad():
        objective.momentum.update()  # ALBEF updates inside forward, before the momentum features
        image_embeds_m = teacher.image_tokens(images)
        image_feat_m = teacher.image_embedding(image_embeds_m)
        text_feat_m = teacher.text_embedding(teacher.text_tokens(ids, mask))
        image_all = torch.cat([image_feat_m, objective.queue.get("image").clone()])
        text_all = torch.cat([text_feat_m, objective.queue.get("text").clone()])
        targets = torch.zeros(len(ids), len(text_all), device=ids.device)
        targets.fill_diagonal_(1)
        i2t_targets = alpha * F.softmax(image_feat_m @ text_all.T / temp, 1) + (1 - alpha) * targets
        t2i_targets = alpha * F.softmax(text_feat_m @ image_all.T / temp, 1) + (1 - alpha) * targets
    sim_i2t, sim_t2i = image_feat @ text_all.T / temp, text_feat @ image_all.T / temp
    itc = (soft_cross_entropy(sim_i2t, i2t_targets) + soft_cross_entropy(sim_t2i, t2i_targets)) / 2
    objective.queue.enqueue(image=image_feat_m, text=text_feat_m, id=batch["image_id"])

    bs = len(ids)
    with torch.no_grad():
        weights_i2t = F.softmax(sim_i2t[:, :bs].float(), dim=1).fill_diagonal_(0)
        weights_t2i = F.softmax(sim_t2i[:, :bs].float(), dim=1).fill_diagonal_(0)
    image_neg = torch.stack([image_embeds[torch.multinomial(weights_t2i[b], 1).item()] for b in range(bs)])
    text_neg_idx = [torch.multinomial(weights_i2t[b], 1).item() for b in range(bs)]
    text_neg, mask_neg = text_embeds[text_neg_idx], mask[text_neg_idx]
    fused = model.fuse(torch.cat([text_embeds, text_embeds, text_neg]), torch.cat([mask, mask, mask_neg]),
                       torch.cat([image_embeds, image_neg, image_embeds]))
    labels = torch.cat([torch.ones(bs), torch.zeros(2 * bs)]).long().to(ids.device)
    itm = F.cross_entropy(model.itm_logits(fused), labels)

    masked, mlm_labels = mask_tokens(ids, mask, objective.special_ids, objective.mask_id, objective.vocab_size,
                                     objective.cfg.mlm_probability)
    with torch.no_grad():
        soft = F.softmax(teacher.mlm_head(teacher.fuse(teacher.text_tokens(masked, mask), mask, image_embeds_m)), -1)
    scores = model.mlm_head(model.fuse(model.text_tokens(masked, mask), mask, image_embeds))  # (b, L, vocab)
    hard = F.cross_entropy(scores.view(-1, scores.shape[-1]), mlm_labels.view(-1))
    distill = -(F.log_softmax(scores, -1) * soft).sum(-1)[mlm_labels != -100].mean()
    return itc + itm + (1 - alpha) * hard + alpha * distill


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(side: str, args: argparse.Namespace, results) -> None:
    from train.optim import param_groups
    from train.registry import MODELS, OBJECTIVES
    from train.tokenizers import build as build_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    builder = MODELS.get(args.model)
    model = builder(builder.Config())
    cfg = OBJECTIVES.get("albef").Config(queue_size=args.queue, itm_negatives="local")
    objective = OBJECTIVES.build("albef", cfg, model).to(device)
    objective.alpha = cfg.alpha
    optimizer = torch.optim.AdamW(param_groups(objective, 0.02), lr=1e-5)
    generator = torch.Generator().manual_seed(1)
    size = model.contract.image_size
    captions = [f"a photo of a {w} number {i}" for i, w in enumerate(["bag", "coat", "sneaker", "shirt"] * args.batch)]
    batch = {"image": torch.randn(args.batch, 3, size, size, generator=generator),
             "image_id": torch.arange(args.batch), **build_tokenizer(model.contract)(captions[:args.batch])}
    batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> None:
        if side == "ours":
            loss = objective(batch)["loss"]
        else:
            loss = reference_forward(objective, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if side == "ours":
            objective.end_step()

    step()  # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else _peak_bytes(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    results[side] = {"step_s": statistics.median(times), "peak_added_mb": (_peak_bytes(device) - baseline) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="albef_tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        for side in ("reference", "ours"):  # one fresh process each: peak memory is per process
            process = context.Process(target=measure, args=(side, args, results))
            process.start()
            process.join()
            if process.exitcode:
                raise SystemExit(f"{side} failed with exit code {process.exitcode}")
        results = dict(results)
    ours, reference = results["ours"], results["reference"]
    print(json.dumps({"config": vars(args), "ours": ours, "reference": reference,
                      "speedup": reference["step_s"] / ours["step_s"],
                      "memory_ratio": ours["peak_added_mb"] / max(reference["peak_added_mb"], 1e-9)}, indent=2))


if __name__ == "__main__":
    main()
