"""Preemption: a stop request from a signal, agreed on by every rank at a step boundary.

Slurm warns a job before its time limit or a preemption (``#SBATCH --signal=B:USR1@300``;
``slurm/train.sh`` forwards it to the trainer) and sends SIGTERM before killing it. Either
signal only sets a flag: the current step finishes, then :meth:`StopRequest.agreed` (called
by every rank after every step, a one-element all-reduce on the gloo control group) tells all
ranks to checkpoint and exit with :data:`train.main.REQUEUE_EXIT` together. A rank that stopped
on its own would leave the others waiting in the next collective.
"""

from __future__ import annotations

import os
import signal

from pipeline.core.log import get_logger
from train import parallel

log = get_logger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installed in the trainer's process before DataLoader workers fork; the workers inherit the
    handler but ignore the signal (guarded by pid): their parent decides when they end."""

    def __init__(self):
        self.pid, self.signal = os.getpid(), None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() == self.pid and self.signal is None:
            self.signal = signal.Signals(signum).name
            log.warning("%s received: stopping after this step with a checkpoint", self.signal)

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (every rank calls this every step)."""
        return parallel.any_rank(self.signal is not None)

    def close(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
