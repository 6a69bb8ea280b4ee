"""One logging setup for every stage: levels, rank-aware prefixes, rank-0 progress bars."""

from __future__ import annotations

import faulthandler
import logging
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_state = {"rank": 0}


def setup_logging(level: str = "INFO", rank: int = 0, world_size: int = 1) -> None:
    """Configure the root logger once per process; distributed runs prefix every line with the rank.

    Also prints every thread's Python stack on a native crash (SIGSEGV, heap abort), so a dead
    rank in a job's log says where it died instead of only its exit code.
    """
    if sys.__stderr__ is not None:  # the process's own stderr: sys.stderr may be a capture without a file
        faulthandler.enable(sys.__stderr__, all_threads=True)
    _state["rank"] = rank
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("PIL", "matplotlib", "urllib3", "fsspec", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None, **kwargs) -> tqdm:
    """A tqdm bar shown on rank 0 only (other ranks iterate silently)."""
    return tqdm(iterable, desc=desc, total=total, disable=_state["rank"] != 0, dynamic_ncols=True, **kwargs)
