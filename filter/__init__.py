"""Curation steps. Each records, for every sample it sees, a decision: a reason ("" keeps it).

A step is a module of this package that registers a :class:`Step` in :data:`STEPS` under the
name its config section has (``clip_score: {...}``: the section is its ``Config``, added to the
build config by registration alone). It has up to two phases (the build command runs them in
order, step after step):

- ``shard(part, samples) -> pa.Table``: per input shard, embarrassingly parallel (a Slurm array
  task owns a range of shards). One row per sample seen: ``row``, ``reason`` and whatever
  scores or features the step keeps.
- ``dataset(table) -> list[str]``: once, over the shard tables of every sample still in the
  running (dataset-wide decisions: a top fraction, deduplication). One reason per row.

A sample is a dict: ``row``, ``uid``, ``image`` (bytes), ``caption``, ``meta`` (the download's json).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator

import pyarrow as pa

from pipeline.core.registry import Registry

STEPS: Registry = Registry("curation step", package="filter")


@dataclasses.dataclass
class StepContext:
    """What a step may read besides its samples: the output layout (earlier steps' files)."""

    layout: Any  # pipeline.core.shards.Layout
    name: str


class Step:
    Config: type

    def __init__(self, cfg: Any, context: StepContext):
        self.cfg, self.context = cfg, context

    has_dataset_phase = False

    def shard(self, part: int, samples: Iterator[dict]) -> pa.Table:
        raise NotImplementedError

    def run_shards(self, parts: Iterable[int], samples_of) -> Iterator[tuple[int, pa.Table]]:
        """(part, table) for each part; ``samples_of(part)`` gives the part's samples still in the running.
        Steps that batch across parts (model inference) override this."""
        for part in parts:
            yield part, self.shard(part, samples_of(part))

    def dataset(self, table: pa.Table) -> list[str]:
        raise NotImplementedError


def decisions(rows: list[int], reasons: list[str], **columns: Any) -> pa.Table:
    """The table a shard phase returns."""
    return pa.table({"row": pa.array(rows, pa.int64()), "reason": pa.array(reasons, pa.string()), **columns})
