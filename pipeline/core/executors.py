"""Executors: run the independent tasks of one phase (a process pool here, or a Ray cluster).

A task is a picklable ``fn(index)`` that writes its outputs atomically and skips them when
present, so an executor may run a task twice (a retry after a killed worker) and a killed phase
resumes by running it again. Slurm arrays run the same tasks from slurm/build_shards.sh (one
``--phase NAME --task I/N`` slice per array task) and need no executor. Each task returns its
resource use, which the benchmarks read.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import resource
import time
from typing import Callable

import threadpoolctl

from pipeline.core.log import get_logger
from pipeline.core.registry import Registry

log = get_logger(__name__)
EXECUTORS: Registry = Registry("executor")


@dataclasses.dataclass(kw_only=True)
class ExecutorConfig:
    name: str = "local"  # local: a process pool on this machine; ray: a Ray cluster
    workers: int = 1  # local: processes at once (0: one per CPU); 1 runs the tasks in this process (no pool to start)
    ray_address: str = ""  # ray: a running cluster ("" -> $RAY_ADDRESS, else a local one on 127.0.0.1)
    ray_cpus_per_task: float = 1.0
    retries: int = 3  # ray: a task whose worker died runs again, up to this many times

    def validate(self) -> None:
        EXECUTORS.get(self.name)
        if self.workers < 0:
            raise ValueError(f"executor.workers must be >= 0, got {self.workers}")


def measured(fn: Callable[[int], None], index: int) -> dict:
    """Run one task; its wall and CPU seconds and the peak RSS of its process so far."""
    start, cpu = time.perf_counter(), time.process_time()
    fn(index)
    return {"task": index, "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "pid": os.getpid()}


def share_cores(threads: int) -> None:
    """A pool worker's initializer: OpenMP pools (torch's, faiss's) of ``threads``, unless OMP_NUM_THREADS is
    set. Each would start one thread per core, and workers x cores threads spin against each other: with 2
    workers on 2 cores the pixel level's 4 reduce tasks over 250k rows took 815 CPU-s, against 281 so."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # read by the pools a task loads (torch)
    threadpoolctl.threadpool_limits(int(os.environ["OMP_NUM_THREADS"]))  # and set in those the preload loaded (faiss)


@EXECUTORS.register("local")
class Local:
    """A process pool (forkserver: workers start clean, not as forks of a parent holding threads)."""

    def __init__(self, cfg: ExecutorConfig, fresh_process: bool = False):
        self.cfg, self.fresh_process = cfg, fresh_process  # fresh_process: one process per task (exact peak RSS)
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[int], None], tasks: range) -> list[dict]:
        workers = min(self.cfg.workers or os.cpu_count() or 1, len(tasks))
        if workers <= 1 and not self.fresh_process:
            return [measured(fn, i) for i in tasks]
        if self.pool is None or self.fresh_process:
            self.close()
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([getattr(fn, "func", fn).__module__])  # imported once, not per worker
            size = self.cfg.workers or os.cpu_count() or 1
            self.pool = concurrent.futures.ProcessPoolExecutor(
                size, mp_context=context, initializer=share_cores, initargs=(max(1, (os.cpu_count() or 1) // size),),
                max_tasks_per_child=1 if self.fresh_process else None)
        return list(self.pool.map(measured, [fn] * len(tasks), tasks))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


@EXECUTORS.register("ray")
class Ray:
    """Tasks as Ray remote functions; a worker killed mid-task is retried (``retries``)."""

    def __init__(self, cfg: ExecutorConfig, fresh_process: bool = False):
        import ray  # an optional dependency: pip install 'vlpipe[ray]'

        self.cfg, self.ray = cfg, ray
        if not ray.is_initialized():
            address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=cfg.workers or None, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        self.remote = ray.remote(num_cpus=cfg.ray_cpus_per_task, max_retries=cfg.retries, max_calls=1 if fresh_process else 0)(measured)

    def map(self, fn: Callable[[int], None], tasks: range) -> list[dict]:
        fn_ref = self.ray.put(fn)
        return self.ray.get([self.remote.remote(fn_ref, i) for i in tasks])

    def close(self) -> None:
        pass
