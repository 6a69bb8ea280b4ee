"""The trainer: components built from the config, then nanoGPT's loop order.

Per step: ``lr_at(step)``, the objective's ``start_step`` hook, ``grad_accum`` micro-steps
(forward, ``engine.backward``, ``engine.step``), ``end_step`` (temperature clamp, EMA), the
stop check (every rank agrees whether a signal asked to stop; see :mod:`train.preemption`), then
at logging, checkpoint and stop steps only the finite check, metrics and checkpoint. The hooks
are those of :class:`train.objective.Objective`.
Objectives never see DeepSpeed; the engine never sees objective-specific code.
"""

from __future__ import annotations

import os
import time

import torch

from pipeline.core import config as config_io
from pipeline.core.log import get_logger, progress, setup_logging
from train import checkpoint, metrics, optim, parallel
from train.compile import compile_blocks
from train.config import TrainConfig
from train.data import TrainLoader
from train.objective import CachesFeatures, FeatureCache
from train.preemption import StopRequest
from train.registry import MODELS, OBJECTIVES
from train.transforms import to_model_input

log = get_logger(__name__)


def accumulate(engine, objective, micro_batches: list[dict]) -> list[dict]:
    """Forward and backward of each micro-batch; DeepSpeed steps at the last one."""
    outs = []
    for batch in micro_batches:
        outs.append(engine(batch))
        engine.backward(outs[-1]["loss"])
        engine.step()  # the optimizer steps only at the accumulation boundary
    return outs


def accumulate_features(engine, objective, micro_batches: list[dict]) -> list[dict]:
    """One loss over all micro-batches' features (:class:`train.objective.FeatureCache`).

    The storing pass runs without gradient; each micro-batch's second pass replays its RNG state
    and the buffers as they were (BatchNorm statistics), so it computes the features the cache
    holds. Each backward is that pass's share of the gradient of the one loss, so it is not
    divided by the number of micro-batches.
    """
    cache, rng = FeatureCache(), []
    buffers = [(b, b.clone()) for b in objective.buffers()]
    with torch.no_grad():
        for batch in micro_batches:
            rng.append(checkpoint.rng_state())
            engine(batch, cache=cache)
    for buffer, saved in buffers:
        buffer.copy_(saved)
    outs = []
    for index, batch in enumerate(micro_batches):
        checkpoint.set_rng_state(rng[index])
        outs.append(engine(batch, cache=cache.select(index)))
        engine.backward(outs[-1]["loss"], scale_wrt_gas=False)
        engine.step()
    return outs


def to_device(batch: dict, device: torch.device) -> dict:
    """Move tensors to the device (asynchronous from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist = parallel.init_distributed(cfg.run.device, cfg.parallel.timeout_min, cfg.parallel.master_port)
        setup_logging(cfg.log.level, self.dist.rank, self.dist.world)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = MODELS.build(cfg.model.name, cfg.model)
        self.objective = OBJECTIVES.build(cfg.objective.name, cfg.objective, model).to(self.dist.device)
        self.loader = TrainLoader(cfg.data, model.contract, self.dist.rank, self.dist.world, cfg.run.seed,
                                  pin_memory=self.dist.device.type == "cuda")
        self.steps_per_epoch = self.loader.batches_per_epoch // cfg.parallel.grad_accum
        self.total_steps = cfg.run.steps or cfg.run.epochs * self.steps_per_epoch
        self.global_batch = cfg.data.batch_size * cfg.parallel.grad_accum * self.dist.world
        caches = isinstance(self.objective, CachesFeatures) and cfg.parallel.grad_accum > 1
        self.accumulate = accumulate_features if caches else accumulate
        contrasted = self.global_batch if caches else cfg.data.batch_size * self.dist.world
        self.objective.check(cfg.data.batch_size * self.dist.world, self.dist.world)
        if cfg.run.compile:  # after the objective, so its momentum copies hold blocks of their own
            compile_blocks(self.objective)
        self.optimizer = optim.build_optimizer(self.objective, cfg.optim, self.dist.device,
                                               self.objective.no_weight_decay())
        run_dir = cfg.run.run_dir.rstrip("/")
        self.checkpointer = checkpoint.Checkpointer(f"{run_dir}/checkpoints", cfg.run.ckpt_every,
                                                    cfg.run.keep_last, self.dist.rank, cfg)
        self.resume_from = self.resume_target()
        other_world = self.resume_from is not None and checkpoint.saved_world(*self.resume_from) != self.dist.world
        ds_config = parallel.deepspeed_config(cfg.parallel, cfg.run, cfg.data.batch_size, self.dist.world,
                                              load_universal=other_world and parallel.partitioned(*self.resume_from))
        self.engine = parallel.wrap(self.objective, self.optimizer, ds_config, cfg.parallel.activation_checkpointing)
        if self.dist.is_main:
            os.makedirs(run_dir, exist_ok=True)
            config_io.save(cfg, f"{run_dir}/config.yaml")
        self.metrics = metrics.Metrics(cfg.log, run_dir, cfg.run.log_every, self.dist.rank, self.dist.world,
                                       self.dist.device, config_io.to_dict(cfg))
        self.step = 0
        self.finite = torch.ones((), dtype=torch.bool, device=self.dist.device)  # every loss since the last check
        self.stop = StopRequest()  # before the DataLoader workers fork
        torch.manual_seed(cfg.run.seed + self.dist.rank)  # per-rank randomness (dropout) from here on
        log.info("global batch %d = %d x %d accum x %d ranks, %d contrasted per loss; %d steps (%d per epoch)",
                 self.global_batch, cfg.data.batch_size, cfg.parallel.grad_accum, self.dist.world, contrasted,
                 self.total_steps, self.steps_per_epoch)

    def state_dict(self) -> dict:
        return {"step": self.step, "data": self.loader.state_dict(), "metrics": self.metrics.state_dict()}

    def resume_target(self) -> tuple[str, str] | None:
        """(checkpoints folder, tag) of ``run.resume``; None to start fresh."""
        spec = self.cfg.run.resume
        if spec == "latest":
            spec = self.checkpointer.folder
            if not checkpoint_exists(spec):
                log.info("resume=latest: no checkpoint yet in %s, starting fresh", spec)
                return None
        return checkpoint.resolve(spec) if spec else None

    def maybe_resume(self) -> dict | None:
        """Restore the checkpoint of :meth:`resume_target`; returns its RNG state (None when there is none)."""
        if self.resume_from is None:
            return None
        state, other_world_data = self.checkpointer.load(self.engine, *self.resume_from, self.dist.world)
        self.step = state["step"]
        if other_world_data is None:
            self.loader.load_state_dict(state["data"])
        else:
            self.loader.load_remapped(other_world_data)
        self.metrics.resume(self.step, state["metrics"])
        return state["rng"]

    def train(self) -> bool:
        """Train to ``total_steps``; False when a stop request ended the run early, at a checkpoint."""
        rng = self.maybe_resume()
        batches = iter(self.loader)
        if rng is not None:  # after iter(): creating the iterator draws from torch's generator
            checkpoint.set_rng_state(rng)
        for step in progress(range(self.step, self.total_steps), desc="train", initial=self.step,
                             total=self.total_steps):
            lr = optim.lr_at(step, self.total_steps, self.cfg.optim.lr, self.cfg.schedule)
            optim.set_lr(self.optimizer, lr)
            out, data_wait = self.train_step(batches, step)
            self.step = step + 1
            last = self.step == self.total_steps
            self.metrics.update(out, self.global_batch // self.dist.world, data_wait)
            log_now, save_now = self.metrics.should_log(self.step, last), self.checkpointer.due(self.step, last)
            stop_now = self.stop.agreed() and not last  # a collective on every rank, every step
            if log_now or save_now or stop_now:
                self.check_finite()
            if log_now:  # before the checkpoint, so a resume never lacks a record
                self.metrics.log(self.step, self.loader.epoch, lr, self.loader.skipped())
            if save_now or stop_now:
                self.checkpointer.save(self.engine, self.step, self.state_dict())
            if stop_now:
                log.warning("stopped at step %d of %d on request; run.resume=latest continues from here",
                            self.step, self.total_steps)
                return False
        return True

    def train_step(self, batches, step: int) -> tuple[dict[str, torch.Tensor], float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns detached terms and data wait."""
        self.objective.start_step(step, self.steps_per_epoch)
        start = time.perf_counter()
        micro_batches = [to_device(next(batches), self.dist.device) for _ in range(self.cfg.parallel.grad_accum)]
        data_wait = time.perf_counter() - start
        # uint8 images normalised on the device, in fp32: autocast casts where it computes
        micro_batches = [to_model_input(batch, self.objective.model.contract, torch.float32, self.cfg.run.channels_last)
                         for batch in micro_batches]
        outs = self.accumulate(self.engine, self.objective, micro_batches)
        terms = {}
        for out in outs:
            self.finite &= torch.isfinite(out["loss"].detach())
            for name, value in out.items():
                terms[name] = terms.get(name, 0.0) + value.detach().float() / len(outs)
        self.objective.end_step()
        return terms, data_wait

    def check_finite(self) -> None:
        """Raise if any rank's loss was non-finite since the last check. Checked only where the host
        syncs anyway (logging, checkpoints), so a NaN is never saved and the GPU is never waited for."""
        if not parallel.all_ranks(self.finite):
            raise FloatingPointError(
                f"non-finite loss on some rank before step {self.step}; nothing after the last checkpoint was "
                "saved: resume from it with a lower optim.lr or parallel.grad_clip > 0")

    def close(self) -> None:
        self.stop.close()
        self.metrics.close()
        parallel.shutdown()


def checkpoint_exists(folder: str) -> bool:
    try:
        checkpoint.resolve(folder)
        return True
    except FileNotFoundError:
        return False
