"""One evaluation run: a model, a dataset, a list of tasks -> JSON results, tables and plots.

``run(cfg)`` is the Python API (the CLI ``python -m pipeline.evaluate`` and the demo call
it). Every rank embeds its share and computes the same metrics; rank 0 writes the files:

- ``{model}__{dataset}__{task}.json``: metrics, the model's identity, the resolved config;
- ``{model}__{dataset}__{task}_*.png``: the task's plots (confusion matrix, recall@k);
- ``training_curves.png``: loss and temperature, when the run directory has metrics.jsonl;
- ``results.csv`` / ``results.md``: every result JSON of the output folder, merged.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

from pipeline.core import config
from train.encoder import Encoder, load_encoder
from pipeline.evaluation import plots, results_table
from pipeline.evaluation.datasets import DatasetConfig, EvalSet
from pipeline.evaluation.features import EvalContext
from pipeline.evaluation.task import TASKS, TaskConfig
from pipeline.core.io import write_json
from pipeline.core.log import get_logger
from train.gather import world

log = get_logger(__name__)


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    checkpoint: str = ""  # a run dir, a checkpoint dir, or open_clip:MODEL[:WEIGHTS]
    output: str = ""  # default: RUN_DIR/eval when the checkpoint is in a run directory
    device: str = "cpu"  # "cuda" means this rank's GPU (LOCAL_RANK)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    batch_size: int = 64
    plots: bool = True
    dataset: DatasetConfig
    tasks: list[TaskConfig]

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: give at least one task")
        if self.batch_size <= 0:
            raise ValueError("batch_size must be positive")


def run_dir_of(checkpoint: str) -> Path | None:
    """The training run directory holding ``checkpoint`` (itself, or a parent up to two levels)."""
    path = Path(checkpoint)
    if not path.exists():
        return None
    for candidate in [path, *path.parents][:3]:
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def checkpoint_step(spec: str) -> int | None:
    """The training step of one of our checkpoints (its ``step_*`` tag); None for other models."""
    if not spec or not Path(spec).exists():
        return None
    from train.checkpoint import resolve

    try:
        _, tag = resolve(spec)
    except FileNotFoundError:
        return None
    match = re.fullmatch(r"step_(\d+)", tag)
    return int(match.group(1)) if match else None


def model_identity(cfg: EvalConfig, encoder: Encoder) -> dict[str, Any]:
    """The spec, the loader's name for the model, and the training step of our checkpoints."""
    return {"spec": cfg.checkpoint or encoder.name, "name": encoder.name, "step": checkpoint_step(cfg.checkpoint)}


def output_dir(cfg: EvalConfig) -> Path:
    if cfg.output:
        return Path(cfg.output)
    run_dir = run_dir_of(cfg.checkpoint)
    if run_dir is None:
        raise ValueError(f"output: {cfg.checkpoint!r} is not in a run directory; give --output")
    return run_dir / "eval"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def _model_slug(spec: str) -> str:
    """A model's name in file names: a run/checkpoint directory's own name, else the spec."""
    return _slug(Path(spec).resolve().name if Path(spec).exists() else spec)


def run(cfg: EvalConfig, encoder: Encoder | None = None) -> list[dict]:
    """Evaluate ``encoder`` (default: loaded from ``cfg.checkpoint``) on every task; the results on every rank."""
    encoder = encoder or load_encoder(cfg.checkpoint, cfg.device)
    encoder.model.eval()  # a model handed over mid-training must not run dropout or update BN statistics
    ctx = EvalContext(encoder, EvalSet(cfg.dataset), cfg.device, cfg.precision, cfg.batch_size)
    identity = model_identity(cfg, encoder)
    dataset = cfg.dataset.tag or cfg.dataset.name
    out = output_dir(cfg)
    rank, _ = world()
    results = []
    for task_cfg in cfg.tasks:
        task = TASKS.get(task_cfg.name)(task_cfg)
        log.info("%s on %s: %s", task_cfg.name, dataset, identity["spec"])
        outcome = task.run(ctx)
        result = {"model": identity, "dataset": dataset, "task": task_cfg.name, "metrics": outcome.metrics,
                  "config": config.to_dict(cfg)}
        if rank == 0:
            stem = out / f"{_model_slug(identity['spec'])}__{_slug(dataset)}__{task_cfg.name}"
            result["plots"] = task.plot(outcome, str(stem)) if cfg.plots else []
            write_json(f"{stem}.json", result)
            log.info("%s: %s", stem.name, ", ".join(f"{k}={v:.4g}" for k, v in outcome.metrics.items()))
        results.append(result)
    if rank == 0:
        _write_run_summary(cfg, out)
    return results


def _write_run_summary(cfg: EvalConfig, out: Path) -> None:
    """The merged table of every result in the folder, and the training curves of the run."""
    results_table.write(results_table.collect([out]), out / "results")
    run_dir = run_dir_of(cfg.checkpoint)
    if cfg.plots and run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        plots.training_curves(run_dir / "metrics.jsonl", str(out / "training_curves.png"))

