"""Several trainer runs in one torchrun launch, one after another in the same ranks:
``torchrun dist_runs.py ARGS [--next ARGS ...]``, each ARGS those of ``python -m train.main``.

A launch costs ~13 s and ~20 CPU-s of process start and imports (torch, DeepSpeed, timm) before
a tiny run's first step; tests that only read finished runs share one. Each run
seeds itself and builds its own engine, so it computes what it computes alone; the process group
stays up between runs (gloo cannot form a second one from torchrun's store, whose keys the first
used), so a run's shutdown is left to the end of the launch."""

import itertools
import sys

from train import parallel
from train.main import main

if __name__ == "__main__":
    shutdown, parallel.shutdown = parallel.shutdown, lambda: None
    for is_separator, argv in itertools.groupby(sys.argv[1:], lambda arg: arg == "--next"):
        if not is_separator:
            assert main(list(argv)) == 0, "a run stopped before its last step"
    shutdown()
