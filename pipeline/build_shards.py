"""From a list of (url, caption) pairs, or from downloaded shards, to curated WebDataset shards.

    python -m pipeline.build_shards --input URLS --output DIR [--config FILE] [key=value ...]
        [--stages prepare,download,basic,decontaminate,clip_score,dedupe,reshard]
        [--phase shard|dataset|all|PHASE] [--task I/N] [--executor local|ray] [--plan]

Stages run in order: ``prepare`` (read and check the list, cut it into parts), ``download``
(img2dataset), the curation ``steps`` of the config (see filter/), then ``reshard``. A stage has a
``shard`` phase, run per input part (``--task I/N``: the I-th of N disjoint slices, one Slurm
array task each) and/or dataset-wide phases (a top-fraction threshold, each dedupe level, the
output plan, shards and manifest), each a set of independent tasks: per input part, per
partition of an intermediate, or once (a small merge), their memory bounded by the config.
``--phase dataset`` runs a stage's dataset-wide phases through the executor (a local process
pool or a Ray cluster); ``--phase NAME --task I/N`` runs one slice of one phase's tasks (a Slurm
array task). Every output is written atomically and skipped when present, so a killed run
resumes with the same command. ``--input`` may be omitted when DIR already holds downloaded
shards (e.g. ``--stages clip_score,dedupe,reshard clip_score.model=<run dir>``). ``--plan``
prints the chain of phases a scheduler runs (``slurm/build_shards.sh``) and exits.

The config has one section per registered curation step (``filter/``), named after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from filter import STEPS, Phase, Step, StepContext
from pipeline import reshard
from pipeline.core import config
from pipeline.core.executors import EXECUTORS, ExecutorConfig
from pipeline.core.io import exists, read_json, read_parquet, write_parquet
from pipeline.core.log import get_logger, setup_logging
from pipeline.core.shards import Layout, alive, samples
from pipeline.core.tasks import task_range
from pipeline.core.errors import run_command
from pipeline.download import DownloadConfig, download, extra_columns
from pipeline.manifest import part_manifest
from pipeline.sources import InputConfig, prepare

log = get_logger(__name__)


@dataclasses.dataclass(kw_only=True)
class BuildSettings:
    """The build command's settings; each registered curation step adds its own section."""

    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    download: DownloadConfig = dataclasses.field(default_factory=DownloadConfig)
    steps: list[str] = dataclasses.field(default_factory=lambda: ["basic", "decontaminate", "clip_score", "dedupe"])
    reshard: reshard.ReshardConfig = dataclasses.field(default_factory=reshard.ReshardConfig)
    executor: ExecutorConfig = dataclasses.field(default_factory=ExecutorConfig)  # runs the dataset-wide phases' tasks
    log_level: str = "INFO"

    def validate(self) -> None:
        for name in self.steps:
            STEPS.get(name)


BuildConfig = config.with_sections("BuildConfig", BuildSettings, STEPS)


class Build:
    """The stages of one output folder; each method is one (stage, phase) or one task of a phase."""

    def __init__(self, cfg: BuildConfig, output: str):
        self.cfg, self.layout = cfg, Layout(output)
        self.steps: dict[str, Step] = {n: STEPS.build(n, getattr(cfg, n), StepContext(self.layout, n)) for n in cfg.steps}

    @functools.cached_property
    def index(self) -> dict:
        if not exists(self.layout.input_index):
            raise FileNotFoundError(f"{self.layout.input_index} is missing: run the prepare stage (give --input)")
        return read_json(self.layout.input_index)

    def parts(self, task: str) -> range:
        return task_range(task, self.index["parts"])

    def download(self, task: str) -> None:
        """Download the parts of ``task``; a resumed run does the retry passes left, on parts no step has read yet."""
        parts = self.parts(task)
        fresh = [p for p in parts if not any(exists(self.layout.step(name, p)) for name in self.cfg.steps)]
        download(self.layout, parts, self.cfg.download, self.index["part_size"], extra_columns(self.layout), retry=fresh)

    # ------------------------------------------------------------------ which rows are still in the running

    def alive_rows(self, part: int, before: str | None) -> pa.Array:
        """Rows of ``part`` downloaded and kept by every step before ``before`` (all steps: None), in row order."""
        status = read_parquet(self.layout.download(part, ".parquet"), ["row", "status"])
        rows = status.filter(pc.equal(status["status"], "success"))["row"].combine_chunks()
        for name in self.cfg.steps[: self.cfg.steps.index(before) if before else None]:
            table = read_parquet(self.layout.step(name, part), ["row", "reason"])
            gone = [table.filter(pc.not_equal(table["reason"], ""))["row"]]
            if self.steps[name].has_dataset_phase:
                gone.append(read_parquet(self.layout.decisions(name, part), ["row"])["row"])
            rows = rows.filter(pc.invert(pc.is_in(rows, value_set=pa.chunked_array(gone, pa.int64()).combine_chunks())))
        return rows.take(pc.sort_indices(rows))

    # ------------------------------------------------------------------ curation steps

    def step_shards(self, name: str, task: str) -> None:
        todo = [p for p in self.parts(task) if not exists(self.layout.step(name, p))]
        if not todo:
            return
        samples_of = PartSamples(self.layout, {p: set(self.alive_rows(p, name).to_pylist()) for p in todo})
        for part, table in self.steps[name].run_shards(todo, samples_of):
            write_parquet(self.layout.step(name, part), table)
        log.info("%s: %d parts done", name, len(todo))

    # ------------------------------------------------------------------ dataset-wide phases

    def phases(self, stage: str) -> list[Phase]:
        """The dataset-wide phases of ``stage`` in order (task counts as far as known: 0 until the data says)."""
        if stage == "reshard":
            return self.reshard_phases()
        if stage in self.steps:
            return self.steps[stage].phases()
        return []

    def phase(self, name: str) -> Phase:
        found = [p for p in self.phases(name.split("/")[0]) if p.name == name]
        if not found:
            raise ValueError(f"unknown phase {name!r}; `--plan` lists them")
        return found[0]

    def run_dataset(self, stage: str, executor, skip: tuple[str, ...] = ()) -> list[dict]:
        """Every dataset-wide phase of ``stage`` (but ``skip``), one after the other, each phase's tasks on ``executor``."""
        usage = []
        for name in [p.name for p in self.phases(stage) if p.name not in skip]:
            phase = self.phase(name)  # again: a phase's task count may follow from the one before
            start = time.perf_counter()
            tasks = executor.map(functools.partial(run_task, self.cfg, self.layout.root, name), range(phase.tasks))
            usage.append({"phase": name, "kind": phase.kind, "tasks": phase.tasks, "wall_s": time.perf_counter() - start, "usage": tasks})
            log.debug("%s: %d tasks in %.1f s", name, phase.tasks, usage[-1]["wall_s"])
        return usage

    # ------------------------------------------------------------------ reshard

    def reshard_phases(self) -> list[Phase]:
        parts = self.index["parts"]
        planned = exists(self.layout.at_root("reshard_plan.parquet"))
        shards = reshard.shards_of(reshard.plan(self.layout, parts, self.cfg.reshard)) if planned else 0
        return [Phase("reshard/survivors", "part", parts, self.reshard_survivors),
                Phase("reshard/plan", "once", 1, lambda _: reshard.plan(self.layout, parts, self.cfg.reshard)),
                Phase("reshard/shards", "partition", shards, self.reshard_shard),
                Phase("reshard/manifest", "part", parts, self.reshard_manifest),
                Phase("reshard/finalize", "once", 1, lambda _: self.reshard_finalize())]

    def reshard_survivors(self, part: int) -> None:
        if exists(reshard.survivors_path(self.layout, part)):
            return
        formats = read_parquet(self.layout.step("basic", part), ["row", "format"]) if "basic" in self.steps else None
        reshard.write_survivors(self.layout, part, self.alive_rows(part, None), formats)

    def reshard_shard(self, index: int) -> None:
        reshard.write_shard(self.layout, reshard.plan(self.layout, self.index["parts"], self.cfg.reshard), index)

    def reshard_manifest(self, part: int) -> None:
        path = reshard.manifest_path(self.layout, part)
        if not exists(path):
            table = reshard.plan(self.layout, self.index["parts"], self.cfg.reshard)
            write_parquet(path, part_manifest(self, part, lambda rows: reshard.shard_column(self.layout, table, part, rows)))

    def reshard_finalize(self) -> dict:
        table = reshard.plan(self.layout, self.index["parts"], self.cfg.reshard)
        stats = reshard.finalize(self.layout, self.index["parts"], reshard.shards_of(table))
        config.save(self.cfg, self.layout.at_root("config.yaml"))
        log.info("kept %d of %d rows in %d shards under %s", stats["kept"], stats["input_rows"], stats["shards"], self.layout.root)
        return stats


def run_task(cfg: BuildConfig, output: str, phase: str, index: int) -> None:
    """One task of a dataset-wide phase, in whatever process an executor runs it."""
    Build(cfg, output).phase(phase).run(index)


class PartSamples:
    """``part -> samples still in the running`` (picklable, for DataLoader workers)."""

    def __init__(self, layout: Layout, rows: dict[int, set[int]]):
        self.layout, self.rows = layout, rows

    def __call__(self, part: int):
        return alive(samples(self.layout.download(part, ".tar")), self.rows[part])


def plan(build: Build, stages: list[str] | None = None) -> list[tuple[str, str, int]]:
    """The chain a scheduler runs, link after link: ("shard", stages whose shard phases run as one
    array, input parts) or ("dataset", phase, its task count; 0: known once the phase before ran).
    Later shard phases read what the dataset phases before them decided, so each link waits for the last."""
    cfg = build.cfg
    chain, group = [], []
    for stage in [s for s in stages or ["download", *cfg.steps, "reshard"] if s != "prepare"]:
        if stage != "reshard":
            group.append(stage)
        phases = build.phases(stage) if stage == "reshard" or (stage in cfg.steps and STEPS.get(stage).has_dataset_phase) else []
        if phases and group:
            chain.append(("shard", ",".join(group), build.index["parts"]))
            group = []
        chain += [("dataset", p.name, p.tasks) for p in phases]
    return chain + [("shard", ",".join(group), build.index["parts"])] if group else chain


def run(cfg: BuildConfig, output: str, input: str | None = None, stages: list[str] | None = None,
        phase: str = "all", task: str = "", executor: Any = None) -> dict | None:
    """Run ``stages`` (default: all) of the build; returns stats when the last phase of reshard ran.
    ``phase``: shard, dataset, all, or one dataset-wide phase's name (then ``task`` slices its tasks)."""
    build = Build(cfg, output)
    stages = stages or ["prepare", "download", *cfg.steps, "reshard"]
    if phase not in ("all", "shard", "dataset"):
        selected = build.phase(phase)
        for index in task_range(task, selected.tasks):
            selected.run(index)
        return None
    shard, dataset = phase in ("all", "shard"), phase in ("all", "dataset")
    own = executor is None and dataset
    executor = EXECUTORS.build(cfg.executor.name, cfg.executor) if own else executor
    try:
        for stage in stages:
            if stage == "prepare" and dataset:
                if input is None:
                    raise ValueError("the prepare stage needs --input")
                prepare(input, cfg.input, build.layout)
            elif stage == "download" and shard:
                build.download(task)
            elif stage in build.steps and shard:
                build.step_shards(stage, task)
            elif stage not in ("prepare", "download", "reshard", *build.steps):
                raise ValueError(f"unknown stage {stage!r} (prepare, download, {', '.join(cfg.steps)}, reshard)")
            if dataset and stage in ("reshard", *build.steps):
                build.run_dataset(stage, executor)
    finally:
        if own:
            executor.close()
    if dataset and "reshard" in stages:
        return read_json(build.layout.at_root("stats.json"))
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="URL list (file or folder); omit to work on DIR's existing shards")
    parser.add_argument("--output", required=True)
    parser.add_argument("--stages", default="", help="comma-separated stages (default: all, in order)")
    parser.add_argument("--phase", default="all", help="shard, dataset, all, or one dataset-wide phase (see --plan)")
    parser.add_argument("--executor", choices=["local", "ray"], help="runs the dataset-wide phases' tasks (executor.name)")
    parser.add_argument("--task", default="", help="I/N: only the I-th of N slices of the shards (a Slurm array task)")
    parser.add_argument("--plan", action="store_true",
                        help="print the chain of phases, one link per line: shard STAGES PARTS | dataset PHASE TASKS (0: known later)")
    config.add_arguments(parser, default=config.CONFIG_ROOT / "data" / "default.yaml")
    args = parser.parse_args(argv)
    cfg = config.from_args(BuildConfig, args, {"executor.name": args.executor})
    setup_logging(cfg.log_level)
    stages = [s for s in args.stages.split(",") if s] or None
    if args.plan:
        print("\n".join(f"{kind} {what} {tasks}" for kind, what, tasks in plan(Build(cfg, args.output), stages)))
        return
    stats = run(cfg, args.output, args.input, stages, args.phase, args.task)
    if stats:
        print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    run_command(main)
