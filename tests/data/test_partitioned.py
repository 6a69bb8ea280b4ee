"""The dataset-wide phases as partitioned tasks: the same decisions as one pass over every row.

A synthetic dedupe input of 3 interleaved parts (planted uid, sha256 and pHash copies, images
too small to hash, a crowd sharing a key value) runs through the step's phases with partitions
small enough that every level spreads over several reduce tasks. The reference is the cascade
over all rows at once (np.unique first-of-group; filter/phash.py's keyed search and
filter/near_dup.py's union-find over the whole set), as the build ran it before.
"""

import functools
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filter import StepContext, phash
from filter.dedupe import Dedupe, DedupeConfig
from filter.near_dup import groups
from pipeline import reshard
from pipeline.core.executors import ExecutorConfig, Local
from pipeline.core.io import read_json, write_json, write_parquet
from pipeline.core.partition import hex_digests, split
from pipeline.core.shards import Layout

PARTS, PART_SIZE, LEVELS = 3, 200, ["rows", "exact", "phash"]


def synthetic(seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = PARTS * PART_SIZE
    uid = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    sha = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    hashes = rng.integers(0, 2**63, (n, 2), dtype=np.uint64)
    for i in rng.choice(n, 40, replace=False):  # same uid as an earlier or later row
        uid[i] = uid[rng.integers(n)]
    for i in rng.choice(n, 60, replace=False):
        sha[i] = sha[rng.integers(n)]
    for i in rng.choice(n, 120, replace=False):  # near copies: a few bits flipped, some of the mirror
        j, bits = rng.integers(n), rng.choice(64, rng.integers(0, 7), replace=False)
        flip = np.uint64(sum(1 << int(b) for b in bits))
        hashes[i] = (hashes[j, 1] ^ flip, hashes[j, 0]) if i % 3 == 0 else (hashes[j, 0] ^ flip, hashes[j, 1])
    crowd = rng.choice(n, 100, replace=False)  # one key's value (the low 2 of 6 blocks) shared by many: the window bounds the work
    hashes[crowd, 0] = (hashes[crowd, 0] & ~np.uint64(0x1FFFFF)) | np.uint64(0xABCDE)
    hashed = rng.random(n) > 0.1
    hexes = lambda a: [bytes(r).hex() for r in a]
    return pa.table({"row": np.arange(n), "reason": [""] * n, "uid": hexes(uid), "sha256": hexes(sha),
                     "caption_norm": ["a caption"] * n,
                     "phash": pa.array(hashes[:, 0], mask=~hashed), "phash_mirror": pa.array(hashes[:, 1], mask=~hashed)})


def reference(table: pa.Table, cfg: DedupeConfig) -> dict[int, str]:
    """The cascade over every row at once."""
    rows = table["row"].to_numpy()
    alive, out = np.arange(len(rows)), {}
    for level in cfg.levels:
        if level == "phash":
            valid = table["phash"].is_valid().to_numpy(zero_copy_only=False)[alive]
            h = np.stack([table[c].fill_null(0).to_numpy()[alive] for c in ("phash", "phash_mirror")], 1)
            pairs = np.flatnonzero(valid)[phash.matching_pairs(h[valid], cfg.phash)]
            root, reason = groups(len(alive), pairs), "near_dup"
        else:
            column = {"rows": "uid", "exact": "sha256"}[level]
            _, first, inverse = np.unique(table[column].to_numpy(zero_copy_only=False)[alive], return_index=True, return_inverse=True)
            root, reason = first[inverse], {"rows": "duplicate_row", "exact": "exact_dup"}[level]
        dropped = root != np.arange(len(alive))
        out.update({int(rows[i]): reason for i in alive[dropped]})
        alive = alive[~dropped]
    return out


def write_input(root, table: pa.Table) -> Layout:
    layout = Layout(str(root))
    write_json(layout.input_index, {"parts": PARTS, "part_size": PART_SIZE})
    for part in range(PARTS):  # interleaved, as prepare's host interleaving leaves them
        write_parquet(layout.step("dedupe", part), table.take(np.arange(part, table.num_rows, PARTS)))
    return layout


def decided(layout: Layout) -> dict[int, str]:
    tables = [pq.read_table(layout.decisions("dedupe", p)) for p in range(PARTS)]
    return {r: why for t in tables for r, why in zip(t["row"].to_pylist(), t["reason"].to_pylist())}


def run_all(step: Dedupe) -> None:
    for phase in step.phases():
        for task in range(phase.tasks):
            phase.run(task)


CFG = DedupeConfig(levels=LEVELS, partition_rows=200)


@pytest.mark.parametrize("merge_batch", [1 << 20, 1])  # 1: the merge de-duplicates after every partition's pairs
def test_partitioned_cascade_equals_one_pass_over_every_row(tmp_path, monkeypatch, merge_batch):
    monkeypatch.setattr("filter.dedupe.MERGE_BATCH", merge_batch)
    table = synthetic()
    step = Dedupe(CFG, StepContext(write_input(tmp_path, table), "dedupe"))
    reduces = {p.name: p.tasks for p in step.phases() if p.name.endswith("/reduce")}
    assert reduces == {"dedupe/0-rows/reduce": 3, "dedupe/1-exact/reduce": 3, "dedupe/2-phash/reduce": 90}
    run_all(step)
    expected = reference(table, CFG)
    assert set(expected.values()) == {"duplicate_row", "exact_dup", "near_dup"} and len(expected) > 100
    assert decided(step.context.layout) == expected


def test_a_partition_task_killed_mid_write_resumes_to_the_same_decisions(tmp_path):
    table = synthetic(seed=1)
    layout = write_input(tmp_path / "out", table)
    step = Dedupe(CFG, StepContext(layout, "dedupe"))
    phases = step.phases()
    reduce_at = next(i for i, p in enumerate(phases) if p.name == "dedupe/2-phash/reduce")
    for phase in phases[:reduce_at]:
        for task in range(phase.tasks):
            phase.run(task)
    # A real process runs the phase's tasks through the CLI and is SIGKILLed as it renames its first output.
    kill_on_rename = ("import os, signal, pipeline.core.io as io; "
                      "io.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
                      "from pipeline.build_shards import main; main(sys.argv[1:])")
    command = [sys.executable, "-c", "import sys; " + kill_on_rename, "--output", str(layout.root), "--phase", "dedupe/2-phash/reduce",
               "--task", "0/1", "steps=[dedupe]", f"dedupe.levels=[{','.join(LEVELS)}]", "dedupe.partition_rows=200", "log_level=WARNING"]
    killed = subprocess.run(command, env={**os.environ, "PYTHONPATH": os.getcwd()}, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    pairs = tmp_path / "out" / "steps" / "dedupe" / "levels" / "2-phash" / "pairs"
    assert not list(pairs.glob("*.parquet")) and list(pairs.glob("*.tmp-*"))  # nothing half-written is visible
    run_all(Dedupe(CFG, StepContext(layout, "dedupe")))  # the same phases again: the killed task redone, the rest skipped
    assert decided(layout) == reference(table, CFG)


@pytest.mark.parametrize("total,count", [(10, 3), (305, 4), (7, 7), (1000, 9)])
def test_shard_runs_from_the_prefix_sum_match_a_cut_of_every_row(total, count):
    bounds = reshard.shard_bounds(total, count)
    assert np.array_equal(np.repeat(np.arange(count), np.diff(bounds)), np.arange(total) * count // total)


def test_the_manifest_shard_of_a_late_part_matches_the_shard_runs_past_int32_products(tmp_path):
    # 3.6M survivors over 1,800 shards: output position x shard count passes 2^31 (a 4M-row build
    # once marked a third of its kept rows as in no shard, or the wrong one)
    layout, counts, shards = Layout(str(tmp_path)), np.array([3_000_000, 600_000]), 1_800
    plan = pa.table({"part": [0, 1], "offset": [0, 3_000_000], "survivors": counts}).replace_schema_metadata({"shards": str(shards)})
    write_parquet(reshard.survivors_path(layout, 1), pa.table({"row": np.arange(0, 1_200_000, 2)}))
    rows = pa.array(np.arange(0, 1_200_000, 1000))
    shard = reshard.shard_column(layout, plan, 1, rows).to_numpy()
    position = 3_000_000 + np.arange(0, 1_200_000, 1000) // 2
    assert np.array_equal(shard, np.searchsorted(reshard.shard_bounds(int(counts.sum()), shards), position, side="right") - 1)


def test_split_gives_each_partition_its_rows_in_order():
    """The map tasks' cut by partition: every row once, in its partition, in input order there."""
    rng = np.random.default_rng(0)
    partition = rng.integers(0, 50, 10_000)
    parts = split(pa.table({"row": np.arange(10_000)}), partition)
    assert sorted(parts) == sorted(set(partition.tolist()))
    for p, table in parts.items():
        assert table["row"].to_numpy().tolist() == np.flatnonzero(partition == p).tolist()
    assert split(pa.table({"row": np.zeros(0, np.int64)}), np.zeros(0, np.int64)) == {}


def test_a_task_that_reads_its_inputs_and_exits_at_once_exits_cleanly(tmp_path):
    """A dataset-wide task reads small intermediates and exits (clip_score/cut, a reduce task). Given a
    Python file object, Arrow read into Python-owned buffers on its IO threads, and one such thread
    released a buffer (taking the GIL) after the interpreter began to exit: SIGABRT, "terminate called
    without an active exception" (core dump: PyBuffer::~PyBuffer in a ReadAsync task), in 2 of 200
    such children run 6 at a time here and once in CI's suite. Children run 8 at once: crowding the
    CPUs is what opens that window."""
    path = tmp_path / "part.parquet"
    write_parquet(str(path), pa.table({"row": np.arange(10_000), "rank": np.arange(10_000)}))
    read_and_exit = ("import sys; sys.setswitchinterval(1)\n"  # this thread keeps the GIL till it exits, as on a busy CPU
                     "from pipeline.core.io import read_parquet\n"
                     "assert read_parquet(sys.argv[1], ['rank']).num_rows == 10_000")
    children = [subprocess.Popen([sys.executable, "-c", read_and_exit, str(path)], env={**os.environ, "PYTHONPATH": os.getcwd()},
                                 stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for child in children:
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 0, stderr[-2000:]


def test_phash_map_spreads_key_values_evenly_over_many_partitions():
    """Key values keep only some blocks of a hash, so their low bits are often zero; a multiplicative
    hash kept those zeros and sent 3.1x the mean records to the largest of 480 partitions (its reduce
    task's memory grew with the pool). Random hashes must fill every partition within a few percent."""
    from filter.dedupe import LEVELS, LevelContext

    rows, cfg = 100_000, DedupeConfig(levels=["phash"])
    rng = np.random.default_rng(0)
    table = pa.table({"row": np.arange(rows), "part": np.zeros(rows, np.int64),
                      "phash": rng.integers(0, 2**63, rows, dtype=np.uint64), "phash_mirror": rng.integers(0, 2**63, rows, dtype=np.uint64)})
    ctx = LevelContext(cfg, 1, 16_000_000, "", None, None)  # sized for a 16M-row pool: 480 partitions
    level = LEVELS.build("phash", ctx)
    assert level.partitions == 480
    sizes = np.array([t.num_rows for t in level.map(0, table).values()])
    assert len(sizes) == 480 and sizes.sum() == rows * level.fanout
    assert sizes.max() < 1.1 * sizes.mean(), sizes.max() / sizes.mean()


def test_uids_that_count_up_in_hex_spread_evenly_over_partitions():
    """A given uid is used as it is: ids 0, 1, 2 ... written as 32 hex digits differ only in their last
    bytes, and a partition by the first 8 bytes sent every row of the rows level to one reduce task."""
    from pipeline.core.partition import hash_partition

    uids = pa.array([f"{i:032x}" for i in range(48_000)])
    sizes = np.bincount(hash_partition(hex_digests(uids, 32), 48), minlength=48)
    assert sizes.max() < 1.1 * sizes.mean(), sizes


def _report_threads(folder: str, task: int) -> None:
    import threadpoolctl

    pools = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "openmp"]
    write_json(f"{folder}/{task}.json", {"env": os.environ.get("OMP_NUM_THREADS"), "pools": pools})


def test_pool_workers_split_the_cores_between_their_openmp_pools(tmp_path):
    """Two workers on this machine's cores: each task's OpenMP pools (faiss's, loaded by the preload before
    any task, and those a task loads) hold cores / 2 threads, not one per core each."""
    executor = Local(ExecutorConfig(workers=2), fresh_process=True)
    try:
        executor.map(functools.partial(_report_threads, str(tmp_path)), range(2))
    finally:
        executor.close()
    expected = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // 2))
    for task in range(2):
        seen = read_json(str(tmp_path / f"{task}.json"))
        assert seen["env"] == expected and seen["pools"] and set(seen["pools"]) == {int(expected)}, seen
