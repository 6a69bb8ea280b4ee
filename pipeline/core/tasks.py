"""How a command's work is cut into independent tasks (Slurm array tasks, pool workers)."""

from __future__ import annotations


def task_range(task: str, count: int) -> range:
    """``I/N`` -> the I-th of N contiguous, disjoint slices of range(count); ``a:b`` -> range(a, b)."""
    if not task:
        return range(count)
    if "/" in task:
        index, total = map(int, task.split("/"))
        if not 0 <= index < total:
            raise ValueError(f"task {task!r}: index must be in [0, {total})")
        return range(count * index // total, count * (index + 1) // total)
    start, stop = (int(x) if x else None for x in task.split(":"))
    return range(count)[slice(start, stop)]
