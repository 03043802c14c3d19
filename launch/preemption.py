"""Preemption: SIGUSR1 / SIGTERM ask the run to checkpoint and exit so that SLURM requeues it.

The handler only sets a flag. The trainer checks it after every step, agrees across ranks (one
rank may get the signal first, or alone), writes a checkpoint on every rank and exits with
``REQUEUE_EXIT_CODE``; ``launch/slurm/*.sbatch`` requeue the job on that code and the requeued
job resumes by itself (``--resume auto``).
"""

from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"


class StopRequest:
    """Remembers whether a stop signal arrived; installs itself for SIGUSR1 and SIGTERM."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.signal_name = ""
        for number in signals:
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: object) -> None:
        self.signal_name = signal.Signals(number).name

    @property
    def requested(self) -> bool:
        return bool(self.signal_name)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with REQUEUE_EXIT_CODE."""

    def __init__(self) -> None:
        super().__init__(REQUEUE_EXIT_CODE)
