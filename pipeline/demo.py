"""The whole pipeline on the embedded pool, on CPU: ``make demo`` (``python -m pipeline.demo``).

    python -m pipeline.demo [--config configs/demo.yaml] [--fresh] [key=value ...]

1. serve the embedded pool (planted faults included) on 127.0.0.1 and write its URL list;
2. download it through img2dataset (``pipeline.download``);
3. bootstrap a scorer the DFN way: curate the trusted seed subset, train a small CLIP on it;
4. curate the pool with that scorer: basic filters, CLIP score, dedupe + decontamination
   against the zero-shot test images, reshard (``pipeline.build_shards``);
5. train CLIP on the curated shards on 2 ranks (torchrun, DeepSpeed ZeRO-2, gloo);
6. evaluate zero-shot on the Fashion-MNIST test split (``pipeline.evaluate``);
7. write the report folder (``pipeline.demo_report``) and print the goals.

Every stage is the same command a user runs by hand; the demo prints each one. A stage that
finished is not run again (its marker is ``OUTPUT/done/<stage>.json``; ``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from pipeline.core import config
from pipeline.core.io import read_json, write_json
from pipeline.core.log import get_logger, setup_logging
from pipeline.core.errors import run_command
from pipeline.demo_report import write_report
from pipeline.serve import serve_pool

log = get_logger("pipeline.demo")


@dataclasses.dataclass(kw_only=True)
class StageConfig:
    config: str  # the stage command's own YAML (relative to configs/)
    overrides: list[str] = dataclasses.field(default_factory=list)  # key=value; "{run}" etc. name demo output paths


@dataclasses.dataclass(kw_only=True)
class Goals:
    zeroshot_top1: float = 0.70
    mismatch_recall: float = 0.80
    mismatch_precision: float = 0.80
    duplicate_recall: float = 0.95
    distinct_images_dropped: int = 0  # at most


@dataclasses.dataclass(kw_only=True)
class DemoConfig:
    output: str = "demo_out"
    ranks: int = 2  # training processes (torchrun --nproc_per_node)
    threads_per_rank: int = 1  # torch threads per process, so ranks x threads fit the cores
    download: StageConfig
    seed_curate: StageConfig  # the trusted seed subset the scorer is trained on
    seed_train: StageConfig
    curate: StageConfig
    train: StageConfig
    evaluate: StageConfig
    goals: Goals = dataclasses.field(default_factory=Goals)


def layout(out: Path) -> dict[str, Path]:
    """Where each stage writes; ``{name}`` in a stage's overrides expands to these paths."""
    names = {"urls": "urls.parquet", "truth": "ground_truth.parquet", "pool": "pool", "seed": "seed", "seed_run": "runs/seed", "run": "runs/clip",
             "eval": "eval", "report": "report", "done": "done"}
    return {"out": out, **{name: out / rel for name, rel in names.items()}}


Paths = dict[str, Path]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    module: str  # the command, run as `python -m module`
    args: Callable[[Paths], list[str]]  # its input/output arguments
    distributed: bool = False  # launched with torchrun on `ranks` processes
    before: Callable[[Paths], None] = lambda paths: None


def _share_download(paths: Paths) -> None:
    """The seed subset is curated from the pool's downloaded shards: link them, fetch nothing twice."""
    for part in ("input", "download"):
        link = paths["seed"] / part
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(paths["pool"] / part, target_is_directory=True)


_CURATION = "basic,decontaminate,clip_score,dedupe,reshard"
STAGES = (
    Stage("download", "pipeline.build_shards",
          lambda p: ["--input", str(p["urls"]), "--output", str(p["pool"]), "--stages", "prepare,download"]),
    Stage("seed_curate", "pipeline.build_shards", lambda p: ["--output", str(p["seed"]), "--stages", "basic,reshard"],
          before=_share_download),
    Stage("seed_train", "train.main", lambda p: [], distributed=True),
    Stage("curate", "pipeline.build_shards", lambda p: ["--output", str(p["pool"]), "--stages", _CURATION]),
    Stage("train", "train.main", lambda p: [], distributed=True),
    Stage("evaluate", "pipeline.evaluate", lambda p: ["--checkpoint", str(p["run"]), "--output", str(p["eval"])]),
)


def command(stage: Stage, cfg: DemoConfig, paths: Paths) -> list[str]:
    """The exact command line of a stage, as a user would type it."""
    stage_cfg: StageConfig = getattr(cfg, stage.name)
    launcher = [sys.executable, "-m", stage.module]
    if stage.distributed:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.ranks}",
                    "-m", stage.module]
    overrides = [item.format_map(paths) for item in stage_cfg.overrides]
    return [*launcher, "--config", stage_cfg.config, *stage.args(paths), *overrides]


def run_stage(stage: Stage, cfg: DemoConfig, paths: Paths) -> float:
    """Run one stage unless it already finished; returns its wall time."""
    marker = paths["done"] / f"{stage.name}.json"
    if marker.exists():
        seconds = read_json(str(marker))["seconds"]
        log.info("%s: done earlier (%.0f s), skipping", stage.name, seconds)
        return seconds
    stage.before(paths)
    argv = command(stage, cfg, paths)
    log.info("%s: %s", stage.name, " ".join(argv))
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads_per_rank), "GLOO_SOCKET_IFNAME": "lo"}
    start = time.monotonic()
    subprocess.run(argv, check=True, env=env)
    seconds = time.monotonic() - start
    write_json(str(marker), {"seconds": seconds, "command": argv})
    log.info("%s: finished in %.0f s", stage.name, seconds)
    return seconds


def run(cfg: DemoConfig, fresh: bool = False) -> dict:
    """All stages in order, then the report; returns the report's summary (goals included)."""
    paths = layout(Path(cfg.output).resolve())
    if fresh and paths["out"].exists():
        shutil.rmtree(paths["out"])
    paths["done"].mkdir(parents=True, exist_ok=True)
    config.save(cfg, paths["out"] / "config.yaml")
    timings: dict[str, float] = {}
    with serve_pool() as server:
        # The server's port changes between runs; the URL list is rewritten every time, and
        # stages that finished earlier do not read it again. The ground truth is kept from the
        # run that downloaded, so the report scores curation against the pool actually served.
        server.write_url_list(paths["urls"])
        if not (paths["done"] / "download.json").exists():
            pq.write_table(server.pool, paths["truth"])
        for stage in STAGES:
            timings[stage.name] = run_stage(stage, cfg, paths)
    timings["total"] = sum(timings.values())  # stages that ran earlier count too
    return write_report(paths, cfg.goals, timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser, default="demo.yaml")
    parser.add_argument("--fresh", action="store_true", help="delete the output folder first")
    args = parser.parse_args(argv)
    setup_logging()
    summary = run(config.from_args(DemoConfig, args), fresh=args.fresh)
    print(summary["text"], flush=True)
    return 0 if summary["goals_met"] else 1


if __name__ == "__main__":
    run_command(main)
