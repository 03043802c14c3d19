"""Signals between a rank and its data-loader workers: what torch's defaults get wrong for a
trainer that must checkpoint when a job is signalled or a worker dies."""

from __future__ import annotations

import signal
import threading

import torch


def outlive_sigterm(worker: int) -> None:
    """A SIGTERM sent to every process of a job (SLURM signals all processes of a step; DeepSpeed's
    launcher terminates each rank's process tree) must not kill the workers of a rank that is
    finishing its step and checkpoint: torch's own handler, installed before this runs, lets a
    worker die of any SIGTERM not sent by its rank, and the rank then fails instead of saving.
    The rank ends its workers itself (done event), and they exit when the rank is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_deaths_at_the_next_batch() -> None:
    """Remove torch's SIGCHLD handler, which raises a killed worker's ``RuntimeError`` in the main
    thread wherever it happens to be: inside a collective's ``except RuntimeError`` (a fallback, a
    retry) it made one rank skip or repeat a collective, and every rank then waited forever. Without
    it the iterator still finds the dead worker itself: its next batch waits at most 5 s
    (``MP_STATUS_CHECK_INTERVAL``), sees the worker gone and raises "DataLoader worker (pid(s) ...)
    exited unexpectedly" from ``next()``, between steps, on that rank."""
    handler = signal.getsignal(signal.SIGCHLD)
    if threading.current_thread() is threading.main_thread() and getattr(handler, "__module__", "") == (
        torch.utils.data._utils.signal_handling.__name__
    ):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
