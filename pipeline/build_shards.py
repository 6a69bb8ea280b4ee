"""From a list of (url, caption) pairs, or from downloaded shards, to curated WebDataset shards.

    python -m pipeline.build_shards --input URLS --output DIR [--config FILE] [key=value ...]
        [--stages prepare,download,basic,decontaminate,clip_score,dedupe,reshard]
        [--phase shard|dataset|all] [--task I/N] [--plan]

Stages run in order: ``prepare`` (read and check the list, cut it into parts), ``download``
(img2dataset), the curation ``steps`` of the config (see filter/), then ``reshard``. A stage has a
``shard`` phase, run per input part (``--task I/N``: the I-th of N disjoint slices, one Slurm
array task each) and/or a ``dataset`` phase run once (top-fraction threshold, dedupe, the
output plan and manifest). Every output is written atomically and skipped when present, so a
killed run resumes with the same command. ``--input`` may be omitted when DIR already holds
downloaded shards (e.g. ``--stages clip_score,dedupe,reshard clip_score.model=<run dir>``).
``--plan`` prints the chain of phases a scheduler runs (``slurm/build_shards.sh``) and exits.

The config has one section per registered curation step (``filter/``), named after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import numpy as np
import pyarrow as pa

from filter import STEPS, Step, StepContext
from pipeline import reshard
from pipeline.core import config
from pipeline.core.io import exists, read_json, read_parquet, write_parquet
from pipeline.core.log import get_logger, setup_logging
from pipeline.core.shards import Layout, alive, samples
from pipeline.core.tasks import task_range
from pipeline.core.errors import run_command
from pipeline.download import DownloadConfig, download, extra_columns
from pipeline.manifest import build_manifest
from pipeline.sources import InputConfig, prepare

log = get_logger(__name__)


@dataclasses.dataclass(kw_only=True)
class BuildSettings:
    """The build command's settings; each registered curation step adds its own section."""

    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    download: DownloadConfig = dataclasses.field(default_factory=DownloadConfig)
    steps: list[str] = dataclasses.field(default_factory=lambda: ["basic", "decontaminate", "clip_score", "dedupe"])
    reshard: reshard.ReshardConfig = dataclasses.field(default_factory=reshard.ReshardConfig)
    log_level: str = "INFO"

    def validate(self) -> None:
        for name in self.steps:
            STEPS.get(name)


BuildConfig = config.with_sections("BuildConfig", BuildSettings, STEPS)


class Build:
    """The stages of one output folder; each method is one (stage, phase)."""

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

    @functools.lru_cache(maxsize=None)
    def _decisions(self, step: str) -> dict[int, str]:
        table = read_parquet(self.layout.decisions(step))
        return dict(zip(table["row"].to_pylist(), table["reason"].to_pylist()))

    def alive_rows(self, part: int, before: str | None) -> set[int]:
        """Rows of ``part`` downloaded and kept by every step before ``before`` (all steps: None)."""
        status = read_parquet(self.layout.download(part, ".parquet"), ["row", "status"])
        rows = {r for r, s in zip(status["row"].to_pylist(), status["status"].to_pylist()) if s == "success"}
        for name in self.cfg.steps[: self.cfg.steps.index(before) if before else None]:
            table = read_parquet(self.layout.step(name, part), ["row", "reason"])
            rows -= {r for r, why in zip(table["row"].to_pylist(), table["reason"].to_pylist()) if why}
            if self.steps[name].has_dataset_phase:
                dropped = self._decisions(name)
                rows = {r for r in rows if not dropped.get(r)}
        return rows

    # ------------------------------------------------------------------ curation steps

    def step_shards(self, name: str, task: str) -> None:
        todo = [p for p in self.parts(task) if not exists(self.layout.step(name, p))]
        if not todo:
            return
        samples_of = PartSamples(self.layout, {p: self.alive_rows(p, name) for p in todo})
        for part, table in self.steps[name].run_shards(todo, samples_of):
            write_parquet(self.layout.step(name, part), table)
        log.info("%s: %d parts done", name, len(todo))

    def step_dataset(self, name: str) -> None:
        if not self.steps[name].has_dataset_phase or exists(self.layout.decisions(name)):
            return
        tables = []
        for part in range(self.index["parts"]):
            table = read_parquet(self.layout.step(name, part))
            tables.append(table.append_column("part", pa.array(np.full(table.num_rows, part, np.int64))))
        table = pa.concat_tables(tables)
        reasons = np.array(self.steps[name].dataset(table), dtype=object)
        dropped = reasons != ""
        write_parquet(self.layout.decisions(name), pa.table({"row": table["row"].filter(pa.array(dropped)), "reason": reasons[dropped].tolist()}))
        log.info("%s: dropped %d of %d", name, dropped.sum(), len(reasons))

    # ------------------------------------------------------------------ reshard

    def plan(self) -> pa.Table:
        survivors = np.array(sorted((r, p) for p in range(self.index["parts"]) for r in self.alive_rows(p, None)), np.int64).reshape(-1, 2)
        return reshard.plan(self.layout, survivors[:, 0], survivors[:, 1], self.cfg.reshard)

    def reshard_shards(self, task: str) -> None:
        table = self.plan()
        count = int(table["shard"].to_numpy().max()) + 1 if table.num_rows else 0
        reshard.write_shards(self.layout, table, task_range(task, count), self.image_formats())

    def reshard_dataset(self) -> dict:
        table = self.plan()
        manifest = build_manifest(self, table)
        stats = reshard.finalize(self.layout, manifest, int(table["shard"].to_numpy().max()) + 1 if table.num_rows else 0)
        config.save(self.cfg, self.layout.at_root("config.yaml"))
        log.info("kept %d of %d rows in %d shards under %s", stats["kept"], stats["input_rows"], stats["shards"], self.layout.root)
        return stats

    def image_formats(self) -> dict[int, str]:
        if "basic" not in self.steps:
            return {}
        formats = {}
        for part in range(self.index["parts"]):
            table = read_parquet(self.layout.step("basic", part), ["row", "format"])
            formats.update(zip(table["row"].to_pylist(), table["format"].to_pylist()))
        return formats


class PartSamples:
    """``part -> samples still in the running`` (picklable, for DataLoader workers)."""

    def __init__(self, layout: Layout, rows: dict[int, set[int]]):
        self.layout, self.rows = layout, rows

    def __call__(self, part: int):
        return alive(samples(self.layout.download(part, ".tar")), self.rows[part])


def plan(cfg: BuildConfig, stages: list[str] | None = None) -> list[tuple[list[str], str]]:
    """The chain a scheduler runs: (stages whose shard phases run as one array, the stage whose
    dataset phase runs after them, "" for none). Later shard phases read what that dataset
    phase decided (which samples are still in the running), so each link waits for the last."""
    chain, group = [], []
    for stage in [s for s in stages or ["download", *cfg.steps, "reshard"] if s != "prepare"]:
        group.append(stage)
        if stage == "reshard" or (stage in cfg.steps and STEPS.get(stage).has_dataset_phase):
            chain.append((group, stage))
            group = []
    return chain + [(group, "")] if group else chain


def run(cfg: BuildConfig, output: str, input: str | None = None, stages: list[str] | None = None,
        phase: str = "all", task: str = "") -> dict | None:
    """Run ``stages`` (default: all) of the build; returns stats when the dataset phase of reshard ran."""
    build = Build(cfg, output)
    stages = stages or ["prepare", "download", *cfg.steps, "reshard"]
    shard, dataset = phase in ("all", "shard"), phase in ("all", "dataset")
    stats = None
    for stage in stages:
        if stage == "prepare" and dataset:
            if input is None:
                raise ValueError("the prepare stage needs --input")
            prepare(input, cfg.input, build.layout)
        elif stage == "download" and shard:
            build.download(task)
        elif stage == "reshard":
            if shard:
                build.reshard_shards(task)
            if dataset:
                stats = build.reshard_dataset()
        elif stage in build.steps:
            if shard:
                build.step_shards(stage, task)
            if dataset:
                build.step_dataset(stage)
        elif stage not in ("prepare", "download"):
            raise ValueError(f"unknown stage {stage!r} (prepare, download, {', '.join(cfg.steps)}, reshard)")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="URL list (file or folder); omit to work on DIR's existing shards")
    parser.add_argument("--output", required=True)
    parser.add_argument("--stages", default="", help="comma-separated stages (default: all, in order)")
    parser.add_argument("--phase", default="all", choices=["all", "shard", "dataset"])
    parser.add_argument("--task", default="", help="I/N: only the I-th of N slices of the shards (a Slurm array task)")
    parser.add_argument("--plan", action="store_true",
                        help="print the chain of phases, one link per line: SHARD_STAGES DATASET_STAGE (- for none)")
    config.add_arguments(parser, default=config.CONFIG_ROOT / "data" / "default.yaml")
    args = parser.parse_args(argv)
    cfg = config.from_args(BuildConfig, args)
    setup_logging(cfg.log_level)
    stages = [s for s in args.stages.split(",") if s] or None
    if args.plan:
        print("\n".join(f"{','.join(shard)} {dataset or '-'}" for shard, dataset in plan(cfg, stages)))
        return
    stats = run(cfg, args.output, args.input, stages, args.phase, args.task)
    if stats:
        print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    run_command(main)
