"""Feature-cached accumulation: peak memory and time of one CLIP step, through real DeepSpeed.

Three ways to take a step, same model (``clip_tiny`` unless ``--config``), fp32, one process:
- ``micro``: micro-batch b, grad_accum 1 (contrasts b samples);
- ``cached``: micro-batch b, grad_accum k, features cached (contrasts b x k, train.loop.accumulate_features);
- ``whole``: micro-batch b x k, grad_accum 1 (contrasts b x k: what the cache replaces).
Peak memory is the resident memory a step adds (benchmarks.measure.PeakRSS), time the median of
``--steps`` steps after one warm-up step.

    python -m benchmarks.accumulation [--batch 64] [--accum 8] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.measure import PeakRSS, stdout_to_stderr


def run(cfg, micro: int, accum: int, steps: int) -> dict:
    from train import parallel
    from train.loop import accumulate, accumulate_features
    from train.registry import MODELS, OBJECTIVES

    torch.manual_seed(0)
    model = MODELS.build(cfg.model.name, cfg.model)
    objective = OBJECTIVES.build(cfg.objective.name, cfg.objective, model)
    parallel_cfg = cfg.parallel.__class__(zero_stage=1, grad_accum=accum)
    engine = parallel.wrap(objective, torch.optim.AdamW(objective.parameters(), lr=1e-4),
                           parallel.deepspeed_config(parallel_cfg, cfg.run, micro, 1), activation_checkpointing=False)
    contract, g = model.contract, torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(micro, 3, contract.image_size, contract.image_size, generator=g),
                "input_ids": torch.randint(1, 400, (micro, contract.context_length), generator=g),
                "attention_mask": torch.ones(micro, contract.context_length, dtype=torch.long),
                "image_id": torch.arange(micro) + i * micro} for i in range(accum)]
    step = accumulate_features if accum > 1 else accumulate
    step(engine, objective, batches)  # warm-up
    times, peaks = [], []
    for _ in range(steps):
        with PeakRSS() as peak:
            start = time.perf_counter()
            step(engine, objective, batches)
            times.append(time.perf_counter() - start)
        peaks.append(peak.added_gib)
    seconds = statistics.median(times)
    return {"micro_batch": micro, "grad_accum": accum, "contrasted": micro * accum, "step_s": round(seconds, 4),
            "samples_per_s": round(micro * accum / seconds, 1), "peak_added_gib": round(max(peaks), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/clip/tiny.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--accum", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pipeline.core import config
    from train import parallel
    from train.config import TrainConfig

    cfg = config.load(TrainConfig, args.config, ["run.run_dir=unused"])
    with stdout_to_stderr():
        parallel.init_distributed("cpu")
        results = {"micro": run(cfg, args.batch, 1, args.steps),
                   "cached": run(cfg, args.batch, args.accum, args.steps),
                   "whole": run(cfg, args.batch * args.accum, 1, args.steps)}
        parallel.shutdown()
    cached, whole, micro = results["cached"], results["whole"], results["micro"]
    print(json.dumps({"benchmark": "accumulation", "config": args.config, **results,
                      "cached_peak_vs_micro": round(cached["peak_added_gib"] / max(micro["peak_added_gib"], 1e-9), 2),
                      "cached_peak_vs_whole": round(cached["peak_added_gib"] / max(whole["peak_added_gib"], 1e-9), 2),
                      "cached_time_vs_whole": round(cached["step_s"] / whole["step_s"], 2)}, indent=2))


if __name__ == "__main__":
    main()
