"""Curation steps. Each records, for every sample it sees, a decision: a reason ("" keeps it).

A step is a module of this package that registers a :class:`Step` in :data:`STEPS` under the
name its config section has (``clip_score: {...}``: the section is its ``Config``, added to the
build config by registration alone). It has a shard phase and, optionally, dataset-wide phases
(the build command runs them in order, step after step):

- ``shard(part, samples) -> pa.Table``: per input shard, embarrassingly parallel (a Slurm array
  task owns a range of shards). One row per sample seen: ``row``, ``reason`` and whatever
  scores or features the step keeps.
- ``phases() -> list[Phase]``: the dataset-wide decisions (a top fraction, deduplication) as a
  chain of partitioned phases, each a set of independent tasks whose memory is bounded by the
  config, not by the dataset: per input part, per partition of an intermediate, or once (a
  small merge). The last one writes ``layout.decisions(step, part)`` for every part: the rows
  of the part it drops, with their reason.

A sample is a dict: ``row``, ``uid``, ``image`` (bytes), ``caption``, ``meta`` (the download's json).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from pipeline.core.io import read_json
from pipeline.core.registry import Registry

STEPS: Registry = Registry("curation step", package="filter")
PHASE_KINDS = ("part", "partition", "once")


@dataclasses.dataclass(frozen=True)
class Phase:
    """``tasks`` independent tasks; ``run(i)`` does task i, writes its outputs atomically and
    returns at once when they are present (so a killed phase resumes by running it again)."""

    name: str  # "<step>/<what>": unique in the build, what --phase names
    kind: str  # one of PHASE_KINDS
    tasks: int
    run: Callable[[int], None]


@dataclasses.dataclass
class StepContext:
    """What a step may read besides its samples: the output layout (earlier steps' files)."""

    layout: Any  # pipeline.core.shards.Layout
    name: str

    @functools.cached_property
    def index(self) -> dict:
        """The prepared input's index (``parts``, ``part_size``): known once the input is prepared."""
        return read_json(self.layout.input_index)

    @property
    def parts(self) -> int:
        return self.index["parts"]


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

    def phases(self) -> list[Phase]:
        """The dataset-wide phases, in order (steps with ``has_dataset_phase``)."""
        return []


def decisions(rows: list[int], reasons: list[str], **columns: Any) -> pa.Table:
    """The table a shard phase returns."""
    return pa.table({"row": pa.array(rows, pa.int64()), "reason": pa.array(reasons, pa.string()), **columns})


def dropped(rows: pa.Array, reasons: pa.Array) -> pa.Table:
    """The table a step's last dataset phase writes per part: the rows it drops and why."""
    return pa.table({"row": pa.array(rows, pa.int64()), "reason": pa.array(reasons, pa.string())})
