"""Distributed setup and the DeepSpeed engine: the only module that imports ``deepspeed``.

- :func:`dist_env` reads the launcher's environment (torchrun, srun or a plain process) into
  a :class:`DistEnv`; nothing else in the project reads these variables.
- :func:`init_distributed` starts the process group (gloo on CPU, NCCL on GPU), for training
  and evaluation alike.
- :func:`wrap` generates the DeepSpeed config from the typed ``parallel`` section and returns
  the engine; :func:`consolidated_state_dict` turns any ZeRO checkpoint into one state dict.
- :func:`local_shard` is how code outside forward/backward touches a parameter: under ZeRO-3
  a parameter's local data is its partition; :func:`clamp_` bounds a parameter's value in the
  optimizer's master copy as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import socket
import subprocess

import fsspec
import torch
import torch.distributed as dist
from torch import nn

from pipeline.core.config import ConfigError
from train.config import ParallelConfig, RunConfig
from train.momentum import Momentum


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return hosts.stdout.split()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(device: str, master_port: int = 29500) -> DistEnv:
    """Rank and rendezvous from torchrun (RANK...), srun (SLURM_PROCID...) or a single process;
    ``device`` "cuda" is this process's GPU (its local rank)."""
    env = os.environ
    if "RANK" in env:  # torchrun (also torchrun inside an srun step)
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    elif int(env.get("SLURM_NTASKS", "1")) > 1:  # one srun task per device
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT", master_port))
    else:  # one process: any free port, so concurrent single-process runs never collide
        rank, world, local, addr, port = 0, 1, 0, "127.0.0.1", free_port()
    torch_device = torch.device("cuda", local) if device.startswith("cuda") else torch.device("cpu")
    return DistEnv(rank=rank, world=world, local_rank=local, device=torch_device, master_addr=addr, master_port=port)


def init_distributed(device: str, timeout_min: int = 30, master_port: int = 29500) -> DistEnv:
    """Join (or, in a single process, form) the process group: NCCL on "cuda", gloo on "cpu"."""
    env = dist_env(device, master_port)
    # DeepSpeed picks its accelerator at import; the config, not the machine, decides.
    os.environ["DS_ACCELERATOR"] = env.device.type
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world,
                                timeout=datetime.timedelta(minutes=timeout_min))
    global _control
    # Host-side flags (stop requests) go over gloo beside NCCL: no device sync for a CPU flag.
    _control = dist.new_group(backend="gloo") if env.world > 1 else None
    return env


def _deepspeed():
    """The deepspeed module; it joins the process group :func:`init_distributed` formed."""
    import deepspeed

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # DeepSpeed's CPU backend compiles (gcc, on first use) and maps a shared-memory all-reduce
        # that only its inference engine calls; training never does, so it is left unbuilt.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(parallel: ParallelConfig, run: RunConfig, micro_batch: int, world: int,
                     load_universal: bool = False) -> dict:
    """The DeepSpeed JSON, generated from the typed section (there is no hand-written copy).
    ``load_universal``: the run resumes a checkpoint of another world size (see :func:`to_universal`)."""
    zero = {
        "stage": parallel.zero_stage,
        "reduce_bucket_size": parallel.reduce_bucket_size,
        "allgather_bucket_size": parallel.allgather_bucket_size,
        "overlap_comm": parallel.overlap_comm,
        "contiguous_gradients": parallel.contiguous_gradients,
    }
    if parallel.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=parallel.stage3_param_persistence_threshold,
                    stage3_max_live_parameters=parallel.stage3_max_live_parameters,
                    stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": parallel.grad_accum,
        "train_batch_size": micro_batch * parallel.grad_accum * world,
        "gradient_clipping": parallel.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, fused on GPU
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        **({"torch_autocast": autocast(parallel)} if run.dtype == "bf16" else {}),
        "checkpoint": {"load_universal": load_universal},
    }


def autocast(parallel: ParallelConfig) -> dict:
    """bf16 as autocast over fp32 weights (train/precision.py), not DeepSpeed's bf16 weights, whose
    bf16 EMA copies round the momentum update away and whose clamps miss the fp32 master copy.
    Gradients are fp32; ``reduce_dtype`` says in which dtype the ranks reduce those of the
    matmul and convolution weights (DeepSpeed reduces the others in fp32 anyway)."""
    section = {"enabled": True, "dtype": "bfloat16"}
    if parallel.reduce_dtype == "fp32":
        section["lower_precision_safe_modules"] = []  # no module's gradients are reduced in bf16
    return section


def wrap(module: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, activation_checkpointing: bool):
    """The DeepSpeed engine around ``module`` (the objective, which holds the model)."""
    deepspeed = _deepspeed()
    if ds_config["zero_optimization"]["stage"] == 3 and any(isinstance(m, Momentum) for m in module.modules()):
        # An EMA copy reads whole online parameters every step; ZeRO-3 leaves each rank a partition
        # (and keeps small "persistent" ones whole besides), so the update would be silently partial.
        raise ConfigError("objectives with momentum encoders (ALBEF, MoCo) do not support ZeRO-3: "
                          "use parallel=deepspeed/zero2.yaml (ZeRO-2 already partitions optimizer state and gradients)")
    if activation_checkpointing:
        module.model.set_grad_checkpointing(True)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine


def to_universal(folder: str, tag: str) -> str:
    """Convert checkpoint ``folder/tag`` (ZeRO partitions of one world size) to DeepSpeed's universal
    format beside it, ``folder/{tag}_universal``, which loads on any world size; returns that tag.
    Called by rank 0 alone (the others wait at a barrier); a finished conversion is reused."""
    from deepspeed.checkpoint.ds_to_universal import main

    out = f"{tag}_universal"
    if not os.path.exists(f"{folder}/{out}/zero"):
        main(argparse.Namespace(input_folder=f"{folder}/{tag}", output_folder=f"{folder}/{out}",
                                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                inject_missing_state=True))
    return out


def partitioned(folder: str, tag: str) -> bool:
    """Whether checkpoint ``folder/tag`` holds ZeRO partitions. Without ZeRO (stage 0) it holds whole
    parameters and optimizer state, which load on any world size as they are."""
    fs, root = fsspec.core.url_to_fs(f"{folder}/{tag}")
    return bool(fs.glob(f"{root}/*zero_pp_rank_*"))  # bf16_zero_pp_rank_* under DeepSpeed's bf16 optimizer


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The data of ``p`` held by this rank (its ZeRO-3 partition, else the whole tensor)."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


_control = None  # the gloo group of init_distributed, for control flags


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (one tiny all-reduce on the control group)."""
    value = torch.tensor([int(flag)], dtype=torch.int32)
    if _control is not None:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control)
    return bool(value.item())


@torch.no_grad()
def clamp_(param: nn.Parameter, min: float | None = None, max: float | None = None) -> None:
    """Clamp ``param`` where the optimizer keeps it: its fp32 master copy (the partition this rank
    owns under ZeRO 1/2, its local partition under ZeRO-3) and the model's copy. The engine
    copies the master into the model after every step, so clamping only ``param.data`` would
    last one forward, and a master past the bound gets no gradient from a clamped forward: it
    would never come back. Elementwise, so no rank needs another's part."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(min, max))
        param.ds_tensor.clamp_(min, max)
    elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO 1/2: this rank's fragment, if any
        param._hp_mapping.get_hp_fragment().clamp_(min, max)
    param.data.clamp_(min, max)  # empty for a partitioned ZeRO-3 parameter; whole for a persistent one


def all_ranks(flag: torch.Tensor) -> bool:
    """True when the boolean ``flag`` is true on every rank (one tiny all-reduce, then a host sync)."""
    flag = flag.to(torch.int32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def consolidated_state_dict(checkpoint_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint of any ZeRO stage, gathered into one state dict on CPU."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not partitioned(checkpoint_dir, tag):  # the module's weights (fp32 under autocast) are whole
        return torch.load(f"{checkpoint_dir}/{tag}/mp_rank_00_model_states.pt", map_location="cpu",
                          weights_only=False)["module"]
    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None
