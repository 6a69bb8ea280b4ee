"""The Ray executor on a local Ray cluster (127.0.0.1, 2 CPUs) gives what the local one gives.

The input is benchmarks/curation_scale.py's synthetic per-part outputs (input, download tars,
clip_score and dedupe tables with planted copies) for 3 parts; the dataset-wide phases of
clip_score, dedupe and reshard run once in this process and once as Ray tasks, one of which is
SIGKILLed mid-task (as it renames its first output): Ray retries it in a new worker.
"""

import os
import signal
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a Ray cluster start and ~60 tasks: minutes on 2 cores
ray = pytest.importorskip("ray")

from benchmarks.curation_scale import synthesise  # noqa: E402
from pipeline import build_shards  # noqa: E402
from pipeline.core import config  # noqa: E402
from pipeline.core.executors import Local, Ray  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ["steps=[clip_score,dedupe]", "clip_score.fraction=0.9", "dedupe.levels=[rows,exact,phash]", "dedupe.partition_rows=2000",
             "reshard.target_shard_size=500", "log_level=WARNING"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # pytest's module name is not importable in workers
    yield
    ray.shutdown()


class KillFirstAttempt:
    """Task 0 of the wrapped phase: its first attempt's process is SIGKILLed as it renames an output."""

    def __init__(self, fn, marker: str):
        self.fn, self.marker = fn, marker

    def __call__(self, index: int) -> None:
        if index == 0 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            import pipeline.core.io as io

            io.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        self.fn(index)


class KillingRay(Ray):
    def __init__(self, cfg, phase: str, marker: str):
        super().__init__(cfg)
        self.phase, self.marker = phase, marker

    def map(self, fn, tasks):
        return super().map(KillFirstAttempt(fn, self.marker) if fn.args[2] == self.phase else fn, tasks)


def build(root: Path, executor) -> None:
    cfg = config.load(build_shards.BuildConfig, None, OVERRIDES)
    b = build_shards.Build(cfg, str(root))
    for stage in ("clip_score", "dedupe", "reshard"):
        b.run_dataset(stage, executor)


def test_ray_executor_gives_the_local_manifest_and_shards_despite_a_killed_task(cluster, tmp_path):
    for name in ("local", "ray"):
        synthesise(str(tmp_path / name), rows=3000, part_size=1000, levels=["rows", "exact", "phash"], rate=0.02)
    build(tmp_path / "local", Local(config.load(build_shards.BuildConfig, None, OVERRIDES).executor))
    cfg = config.load(build_shards.BuildConfig, None, OVERRIDES).executor
    marker = str(tmp_path / "killed-once")
    build(tmp_path / "ray", KillingRay(cfg, "dedupe/2-phash/reduce", marker))
    assert os.path.exists(marker)  # the first attempt ran and died
    for name in ("manifest.parquet", "stats.json", "sizes.json", "reshard_plan.parquet"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    shards = sorted(p.name for p in (tmp_path / "local" / "shards").glob("*.tar"))
    assert len(shards) >= 5 and shards == sorted(p.name for p in (tmp_path / "ray" / "shards").glob("*.tar"))
    for shard in shards:
        assert (tmp_path / "ray" / "shards" / shard).read_bytes() == (tmp_path / "local" / "shards" / shard).read_bytes()
