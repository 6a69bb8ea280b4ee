"""Checkpoints: DeepSpeed's engine state (any ZeRO stage) plus this trainer's state, per rank.

Layout of ``run_dir/checkpoints/``::

    step_0000100/            DeepSpeed's files (model, optimizer partitions) written by every rank
        trainer_rank{r}.pt   step, data position and RNG states of rank r
        config.yaml          the resolved config (rebuilds the model for export)
        model.safetensors    the consolidated fp32 weights (rank 0), readable without DeepSpeed
    latest                   the tag of the newest complete checkpoint

``latest`` moves (atomically) only after every rank has finished writing, so a job killed
mid-save resumes from the previous checkpoint. The last ``keep_last`` tags are kept.
"""

from __future__ import annotations

import random

import fsspec
import numpy as np
import torch

from pipeline.core import config as config_io
from pipeline.core.io import atomic_write, exists
from pipeline.core.log import get_logger
from train.parallel import barrier, consolidated_state_dict, partitioned, to_universal

log = get_logger(__name__)
WEIGHTS = "model.safetensors"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def resolve(spec: str) -> tuple[str, str]:
    """(checkpoints dir, tag) of a run dir, a checkpoints dir or a tag dir."""
    spec = spec.rstrip("/")
    for folder in (f"{spec}/checkpoints", spec):
        if exists(f"{folder}/latest"):
            with fsspec.open(f"{folder}/latest", "r") as f:
                return folder, f.read().strip()
    if exists(f"{spec}/config.yaml"):  # a tag directory
        folder, _, tag = spec.rpartition("/")
        return folder, tag
    raise FileNotFoundError(f"no checkpoint at {spec} (expected a run dir, a checkpoints dir or a step_* dir)")


def write_weights(folder: str, tag: str) -> None:
    """``tag/model.safetensors``: the fp32 weights consolidated from every rank's ZeRO files of ``tag``."""
    from safetensors.torch import save

    state, seen = consolidated_state_dict(folder, tag), set()
    for name, tensor in state.items():  # safetensors stores no aliases: tied tensors get their own copy
        state[name] = tensor.clone() if tensor.data_ptr() in seen else tensor.contiguous()
        seen.add(tensor.data_ptr())
    with atomic_write(f"{folder}/{tag}/{WEIGHTS}") as f:
        f.write(save(state))


def read_weights(folder: str, tag: str) -> dict[str, torch.Tensor] | None:
    """The consolidated weights of ``tag`` if it has them (checkpoints of older runs do not), loaded without DeepSpeed."""
    from safetensors.torch import load

    if not exists(f"{folder}/{tag}/{WEIGHTS}"):
        return None
    with fsspec.open(f"{folder}/{tag}/{WEIGHTS}", "rb") as f:
        return load(f.read())


class Checkpointer:
    def __init__(self, folder: str, every: int, keep_last: int, rank: int, cfg):
        self.folder, self.every, self.keep_last, self.rank, self.cfg = folder.rstrip("/"), every, keep_last, rank, cfg

    def due(self, step: int, last: bool) -> bool:
        return last or bool(self.every and step % self.every == 0)

    def save(self, engine, step: int, trainer_state: dict) -> None:
        tag = tag_for(step)
        engine.save_checkpoint(self.folder, tag=tag, save_latest=False)  # collective: every rank writes its part
        with atomic_write(f"{self.folder}/{tag}/trainer_rank{self.rank}.pt") as f:
            torch.save({**trainer_state, "rng": rng_state()}, f)
        if self.rank == 0:
            config_io.save(self.cfg, f"{self.folder}/{tag}/config.yaml")
        barrier()  # every rank's files are complete before `latest` points at them
        if self.rank == 0:
            write_weights(self.folder, tag)
            with atomic_write(f"{self.folder}/latest", "w") as f:
                f.write(tag)
            self._prune()
        log.info("saved checkpoint %s", tag)

    def _prune(self) -> None:
        fs, root = fsspec.core.url_to_fs(self.folder)
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        tags = sorted(name for name in names if name.startswith("step_") and not name.endswith("_universal"))
        for tag in tags[:-self.keep_last]:
            for name in (tag, f"{tag}_universal") if f"{tag}_universal" in names else (tag,):
                fs.rm(f"{root}/{name}", recursive=True)

    def load(self, engine, folder: str, tag: str, world: int) -> tuple[dict, list[dict] | None]:
        """Restore the engine; returns this rank's trainer state (its ``rng`` is for :func:`set_rng_state`)
        and, when the checkpoint is of another world size, every saved rank's data state (else None).

        Another world size loads DeepSpeed's universal form of a ZeRO checkpoint (the engine was built
        with ``load_universal``): model, fp32 master weights and optimizer state re-partitioned; a
        checkpoint without ZeRO (stage 0) is whole and loads as it is."""
        saved = saved_world(folder, tag)
        load_tag = tag
        if saved != world and partitioned(folder, tag):
            if self.rank == 0:
                log.warning("%s/%s was written by %d ranks, this run has %d: converting it to DeepSpeed's universal "
                            "checkpoint", folder, tag, saved, world)
                to_universal(folder, tag)
            barrier()
            load_tag = f"{tag}_universal"
        engine.load_checkpoint(folder, tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        if saved == world:
            state = _read_state(folder, tag, self.rank)
            log.info("resumed from %s/%s at step %d", folder, tag, state["step"])
            return state, None
        states = [_read_state(folder, tag, rank) for rank in range(saved)]
        # RNG streams stay per rank where the rank existed; the metrics accumulated since the last
        # record were per-rank means of another world: the next record starts afresh.
        state = {**states[min(self.rank, saved - 1)], "metrics": None}
        if self.rank >= saved:
            state["rng"] = None
        log.info("resumed from %s/%s (%d ranks) on %d ranks at step %d", folder, tag, saved, world, state["step"])
        return state, [s["data"] for s in states]


def saved_world(folder: str, tag: str) -> int:
    """Ranks of the run that wrote checkpoint ``folder/tag`` (one trainer state per rank)."""
    fs, root = fsspec.core.url_to_fs(f"{folder}/{tag}")
    return len(fs.glob(f"{root}/trainer_rank*.pt"))


def _read_state(folder: str, tag: str, rank: int) -> dict:
    with fsspec.open(f"{folder}/{tag}/trainer_rank{rank}.pt", "rb") as f:
        return {"metrics": None, **torch.load(f, weights_only=False)}  # "metrics": absent in older checkpoints
