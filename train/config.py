"""The trainer's configuration tree: ``TrainConfig`` and its sections.

Loaded strictly by :mod:`pipeline.core.config` (unknown keys and wrong types raise, naming the
key and file). ``model`` and ``objective`` are :class:`pipeline.core.config.Section` s: their keys
are those of the ``Config`` dataclass of the registered entry named by ``name``. ``parallel`` is usually
given as a file (``parallel: ../deepspeed/zero2.yaml``); the DeepSpeed JSON is generated
from it in :mod:`train.parallel`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pipeline.core.config import Section
from train.registry import MODELS, OBJECTIVES


@dataclasses.dataclass(kw_only=True)
class ModelSection(Section):
    """The keys of the named model's ``Config``."""

    registry = MODELS


@dataclasses.dataclass(kw_only=True)
class ObjectiveSection(Section):
    """The keys of the named objective's ``Config``."""

    registry = OBJECTIVES


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    run_dir: str  # local (or mounted) path; holds config.yaml, metrics.jsonl, tensorboard/, checkpoints/
    seed: int = 0
    steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # 0 = only at the end
    keep_last: int = 3
    resume: str = ""  # "" | "latest" | a checkpoint tag directory
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast over fp32 weights (train/precision.py)
    channels_last: bool = False  # NHWC input images (convolutional models on GPU); the weights keep their layout
    compile: bool = False  # torch.compile the model's repeated blocks (regional compilation) before DeepSpeed

    def validate(self) -> None:
        if (self.steps > 0) == (self.epochs > 0):
            raise ValueError(f"set exactly one of run.steps and run.epochs (got {self.steps} and {self.epochs})")
        if self.log_every < 1 or self.keep_last < 1 or self.ckpt_every < 0:
            raise ValueError("log_every and keep_last must be >= 1 and ckpt_every >= 0")
        if "://" in self.run_dir:
            # DeepSpeed's checkpoints, TensorBoard and wandb write local files only.
            raise ValueError(f"run.run_dir must be a local or mounted directory, not the URL {self.run_dir}: "
                             "train into a local directory and copy it to the object store afterwards")


@dataclasses.dataclass(kw_only=True)
class SourceConfig:
    """One weighted source of the resampled mix."""

    path: str  # shard directory (with sizes.json) or a brace pattern of tars
    weight: float = 1.0


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    path: str = ""  # shard directory with sizes.json, or a brace pattern "dir/{000000..000127}.tar"
    num_samples: int = 0  # samples per epoch; required for a brace pattern, else from sizes.json
    batch_size: int = 32  # micro-batch per rank
    workers: int = 2  # DataLoader workers per rank (0 = in the training process)
    shuffle_buffer: int = 1000
    resampled: bool = False  # draw shards with replacement (weighted by source); no shard-count limit
    sources: list[SourceConfig] = dataclasses.field(default_factory=list)  # extra sources, resampled mode
    transform: str = "clip_train"  # a name in train.data.TRANSFORMS
    text: bool = True  # read and tokenize captions
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range (open_clip's default)
    # clip_train after the crop (ALBEF pretrains with both): a random horizontal flip, and RandAugment's
    # randaugment_ops ops of ALBEF's set at randaugment_magnitude (of 10); 0 ops = off.
    hflip: bool = False
    randaugment_ops: int = 0
    randaugment_magnitude: int = 7
    jitter_strength: float = 1.0  # colour jitter strength of the two-view presets (simclr, moco_v2)
    draft: bool = True  # decode JPEGs at reduced scale when they are larger than the crop
    # Several captions per image (COCO-style shards, one tar sample per pair): the key of each sample's
    # .json that names its image, so that pairs of one image are never each other's negatives (CLIP, ALBEF
    # ITC and ITM). "" = every pair is its own image (its __key__). A sample without it is skipped, counted.
    image_id_key: str = ""

    def validate(self) -> None:
        if not self.path and not self.sources:
            raise ValueError("data.path (or data.sources) is required")
        if self.sources and not self.resampled:
            raise ValueError("data.sources mixes weighted sources and needs data.resampled: true")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError("data.batch_size must be >= 1 and data.workers >= 0")
        if self.randaugment_ops < 0 or not 0 <= self.randaugment_magnitude <= 10:
            raise ValueError("data.randaugment_ops must be >= 0 and data.randaugment_magnitude in [0, 10]")


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"  # a name in train.optim.OPTIMIZERS: adamw | sgd | lars
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    momentum: float = 0.9  # sgd, lars
    trust_coefficient: float = 1e-3  # lars: eta in eta * ||w|| / ||update||


@dataclasses.dataclass(kw_only=True)
class ScheduleConfig:
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio at the last step


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    """DeepSpeed settings (``configs/deepspeed/zero{0,1,2,3}.yaml``; 0 = ZeRO off)."""

    zero_stage: Literal[0, 1, 2, 3] = 1  # 0 = plain data parallel (whole parameters: LARS)
    grad_clip: float = 0.0  # max global grad norm; 0 = off (open_clip, ALBEF, MoCo, SimCLR do not clip)
    grad_accum: int = 1
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # run.dtype=bf16: gradient reduction dtype (DDP's is fp32)
    activation_checkpointing: bool = False
    reduce_bucket_size: int = 50_000_000  # elements; several buckets per model, so overlap_comm overlaps
    allgather_bucket_size: int = 50_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    stage3_param_persistence_threshold: int = 100_000  # ZeRO-3: params smaller than this stay whole
    stage3_max_live_parameters: int = 1_000_000_000
    master_port: int = 29500  # used when the launcher does not set MASTER_PORT (srun, single process)
    timeout_min: int = 30  # collective timeout

    def validate(self) -> None:
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")


@dataclasses.dataclass(kw_only=True)
class LogConfig:
    level: str = "INFO"
    tensorboard: bool = True
    wandb_project: str = ""  # "" = off


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    run: RunConfig
    data: DataConfig
    model: ModelSection
    objective: ObjectiveSection
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def validate(self) -> None:
        if self.schedule.warmup_steps >= max(self.run.steps, 1) and self.run.steps:
            raise ValueError(f"schedule.warmup_steps {self.schedule.warmup_steps} >= run.steps {self.run.steps}")
