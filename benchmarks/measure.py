"""What every benchmark needs: peak memory of a block, and a stdout kept for the JSON result."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import psutil


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval

    def __enter__(self):
        self.process, self._stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def added_gib(self) -> float:
        return (self.peak - self.base) / 2**30


@contextlib.contextmanager
def stdout_to_stderr():
    """Libraries that print progress on stdout (img2dataset and its worker processes, model
    loaders) write to stderr inside the block; stdout stays for the JSON result."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
