"""Training metrics: cross-rank reduction in one place, then JSONL, TensorBoard and wandb.

``metrics.jsonl`` holds one JSON object per logged step (step, epoch, loss, the objective's
terms, lr, samples_per_s, data_wait_s, mem_rss_gb, skip counters). Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import psutil
import torch
import torch.distributed as dist

from pipeline.core.io import atomic_write, is_local
from pipeline.core.log import get_logger
from train.config import LogConfig

log = get_logger(__name__)


def _reduce(values: dict[str, torch.Tensor | float], op: dist.ReduceOp, device: torch.device) -> dict[str, float]:
    """One all-reduce of the values as a float64 vector, in the given key order: the caller's keys are
    the same on every rank (a fixed list), so every rank enters the collective with the same shape."""
    if not values:
        return {}
    vector = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()])
    if dist.is_initialized():
        dist.all_reduce(vector, op=op)
    return dict(zip(values, vector.tolist()))  # the one host sync of a logging step


class Metrics:
    """Accumulates per-step values; every ``log_every`` steps reduces them and writes one record."""

    def __init__(self, cfg: LogConfig, run_dir: str, log_every: int, rank: int, world: int, device: torch.device,
                 config: dict):
        self.cfg, self.run_dir, self.log_every = cfg, run_dir.rstrip("/"), log_every
        self.rank, self.world, self.device = rank, world, device
        self.terms: dict[str, torch.Tensor] = {}  # device tensors: no host sync per step
        self.samples, self.data_wait, self.steps_since = 0, 0.0, 0
        self.started = time.perf_counter()
        self.writers = self._writers(config) if rank == 0 else []

    def _writers(self, config: dict) -> list:
        writers = [JsonlWriter(f"{self.run_dir}/metrics.jsonl")]
        if self.cfg.tensorboard:
            writers.append(TensorBoardWriter(f"{self.run_dir}/tensorboard"))
        if self.cfg.wandb_project:
            writers.append(WandbWriter(self.cfg.wandb_project, self.run_dir, config))
        return writers

    def state_dict(self) -> dict:
        """What was accumulated since the last record: a resume mid-interval logs the same means."""
        return {"terms": dict(self.terms), "samples": self.samples, "data_wait": self.data_wait,
                "steps_since": self.steps_since}

    def resume(self, step: int, state: dict | None) -> None:
        """Drop records past ``step`` (written after the checkpoint a resumed run restarts from)
        and restore the accumulators of ``state`` (None: a checkpoint written before they were saved)."""
        for writer in self.writers:
            writer.truncate(step)
        if state:
            self.terms, self.samples = dict(state["terms"]), state["samples"]
            self.data_wait, self.steps_since = state["data_wait"], state["steps_since"]

    def update(self, out: dict[str, torch.Tensor], samples: int, data_wait: float) -> None:
        for name, value in out.items():
            self.terms[name] = self.terms.get(name, 0.0) + value.detach().double()
        self.samples += samples
        self.data_wait += data_wait
        self.steps_since += 1

    def should_log(self, step: int, last: bool) -> bool:
        return step % self.log_every == 0 or last

    def log(self, step: int, epoch: int, lr: float, skipped: dict[str, int]) -> dict[str, float]:
        """Reduce over ranks (mean of terms, sum of samples and skips, max of memory and wait) and write."""
        elapsed = time.perf_counter() - self.started
        # Sorted term names and the fixed list of skip reasons: the same vector layout on every rank.
        sums = _reduce({**{k: self.terms[k] / self.steps_since for k in sorted(self.terms)},
                        "samples": float(self.samples), **{f"skipped_{k}": float(v) for k, v in skipped.items()}},
                       dist.ReduceOp.SUM, self.device)
        means = {k: sums.pop(k) for k in sorted(self.terms)}
        rss = psutil.Process().memory_info().rss / 2**30
        maxima = _reduce({"data_wait_s": self.data_wait, "mem_rss_gb": rss, "elapsed": elapsed}, dist.ReduceOp.MAX,
                         self.device)
        record = {"step": step, "epoch": epoch, **{k: v / self.world for k, v in means.items()}, "lr": lr,
                  "samples_per_s": sums.pop("samples") / max(maxima.pop("elapsed"), 1e-9), **maxima,
                  **{k: int(v) for k, v in sums.items()}}
        for writer in self.writers:
            writer.write(record)
        self.terms, self.samples, self.data_wait, self.steps_since = {}, 0, 0.0, 0
        self.started = time.perf_counter()
        return record

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class JsonlWriter:
    def __init__(self, path: str):
        if not is_local(path):
            raise ValueError(f"metrics.jsonl needs a local run_dir, got {path}")
        self.path = path
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def truncate(self, step: int) -> None:
        self.file.close()
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        self.file = open(self.path, "a")

    def close(self) -> None:
        self.file.close()


class TensorBoardWriter:
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir, self.summary_writer = log_dir, SummaryWriter
        self.writer = SummaryWriter(log_dir)

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def truncate(self, step: int) -> None:
        """TensorBoard hides the events of earlier files from ``purge_step`` on: those after the checkpoint."""
        self.writer.close()
        self.writer = self.summary_writer(self.log_dir, purge_step=step + 1)

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """One wandb run per run_dir: its id is kept in ``run_dir/wandb_id``, so a requeued or resumed
    job continues the same run (``resume="allow"``) instead of starting a new one."""

    def __init__(self, project: str, run_dir: str, config: dict):
        import wandb

        id_file = f"{run_dir}/wandb_id"
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:16]  # wandb ids: up to 64 of [a-z0-9]
            with atomic_write(id_file, "w") as f:
                f.write(run_id)
        self.run = wandb.init(project=project, dir=run_dir, config=config, id=run_id, resume="allow")

    def write(self, record: dict) -> None:
        self.run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def truncate(self, step: int) -> None:
        pass  # wandb keeps steps monotone: it drops replayed steps up to its last one (equal values on replay)

    def close(self) -> None:
        self.run.finish()
