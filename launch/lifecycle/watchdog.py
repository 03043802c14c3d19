"""The hang watchdog: a rank that makes no progress for ``train.hang_timeout_s`` stops every rank.

A rank that hangs (SIGSTOPped, frozen in a kernel or a filesystem call, its data stuck) leaves the
others waiting for it in the next collective forever, and no collective can write a checkpoint
without it. So each rank runs a thread that writes a heartbeat every few seconds to
``<run>/heartbeats/rank<N>.json`` (step, time of its last finished step, time of the beat, host,
pid; the run folder is on the file system all ranks share, as the checkpoints need). The trainer
reports each finished step (``beat``); evaluation and checkpoint writing are not steps: inside
them (``paused``) a rank has ``PAUSED_FACTOR`` times the timeout. When a rank's own last step is
older than that, its thread reads every heartbeat and names the stuck rank: the one whose
heartbeat itself went stale (its process stopped or frozen whole), else the one still drawing its
data or furthest behind (the others wait for it in the next step's collective). The
lowest-numbered rank that is not stuck prints one line; every rank
whose thread fires exits with 75 (the main thread is blocked inside a collective, so the thread
ends the process itself): the scheduler requeues, and ``--resume auto`` continues from the newest
checkpoint, which no stop could add to. The launcher ends a rank that cannot even run its thread.
Written by hand: torch's own collective timeouts (gloo's and NCCL's) raise an error naming no rank,
and only in the rank that waits, after the process group's timeout (30 minutes by default).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tritower.data.atomic import write_text_atomic
from tritower.launch.lifecycle.preemption import REQUEUE_EXIT_CODE, record_exit

PAUSED_FACTOR = 4
"""Evaluation and checkpoint writes get this many times the timeout (they take longer than a step,
and a rank can hang inside them too)."""


class HangWatchdog:
    """One rank's heartbeat thread and stuck-rank check (``timeout_s`` 0: off, nothing started)."""

    def __init__(self, folder: Path, rank: int, world_size: int, timeout_s: float) -> None:
        self.folder, self.rank, self.world_size, self.timeout_s = folder, rank, world_size, timeout_s
        self.interval = min(10.0, max(timeout_s / 4, 0.5))
        self.step, self.progress_at, self.pause_depth = 0, time.time(), 0
        self.phase = "step"
        """What the main thread is in: ``data`` (drawing the next batch) or ``step`` (the step's
        compute and collectives); the trainer sets it."""
        self.thread: threading.Thread | None = None
        self.closed = False

    def start(self, step: int) -> None:
        """Start watching from ``step`` (the trainer calls it once the first step is done: the first
        step may compile kernels for minutes)."""
        if self.timeout_s <= 0 or self.thread is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.beat(step)
        self._write()  # at once: a rank stopped before its thread's first beat is still on record
        self.thread = threading.Thread(target=self._run, name="tritower-watchdog", daemon=True)
        self.thread.start()

    def beat(self, step: int) -> None:
        """Step ``step`` finished on this rank."""
        self.step, self.progress_at = step, time.time()

    def close(self) -> None:
        """The loop is over (finished, stopped, diverged): the ranks' last steps no longer line up."""
        self.closed = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation or a checkpoint: no steps for a while, by design (``PAUSED_FACTOR`` x the timeout)."""
        self.pause_depth += 1
        self.progress_at = time.time()
        try:
            yield
        finally:
            self.pause_depth -= 1
            self.progress_at = time.time()

    def _write(self) -> None:
        beat = {"rank": self.rank, "step": self.step, "phase": self.phase}
        beat |= {"progress_at": self.progress_at, "beat_at": time.time()}
        beat |= {"host": socket.gethostname(), "pid": os.getpid()}
        with contextlib.suppress(OSError):  # a heartbeat that cannot be written is itself a sign; never fatal
            write_text_atomic(self.folder / f"rank{self.rank}.json", json.dumps(beat))

    def read(self) -> dict[int, dict]:
        """Every rank's last heartbeat that can be read."""
        beats = {}
        for rank in range(self.world_size):
            with contextlib.suppress(OSError, ValueError):
                beats[rank] = json.loads((self.folder / f"rank{rank}.json").read_text())
        return beats

    def stuck(self, beats: dict[int, dict], now: float) -> tuple[list[int], str]:
        """(the stuck ranks, why): heartbeats gone stale first, else the ranks furthest behind."""
        stale_after = max(3 * self.interval, 5.0)
        stale = [r for r in range(self.world_size) if r not in beats or now - beats[r]["beat_at"] > stale_after]
        if stale:
            ages = ", ".join(
                f"rank {r}: " + (f"no heartbeat for {now - beats[r]['beat_at']:.0f} s" if r in beats else "none")
                for r in stale
            )
            return stale, f"its process has stopped ({ages})"
        lowest = min(beat["step"] for beat in beats.values())
        behind = [r for r, beat in sorted(beats.items()) if beat["step"] == lowest]
        if len(behind) == len(beats):
            waiting = [r for r, beat in sorted(beats.items()) if beat.get("phase") == "data"]
            if waiting and len(waiting) < len(beats):  # the others wait for it in the step's collectives
                return waiting, f"it is still drawing the batch of step {lowest + 1} from its data"
            return behind, f"every rank is at step {lowest}: none is behind"
        return behind, f"it is at step {lowest}, the others at step {max(b['step'] for b in beats.values())}"

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self._write()
            allowed = self.timeout_s * (PAUSED_FACTOR if self.pause_depth else 1)
            if self.closed or time.time() - self.progress_at < allowed:
                continue
            now = time.time()
            ranks, why = self.stuck(self.read(), now)
            speaker = min((r for r in range(self.world_size) if r not in ranks), default=self.rank)
            if self.rank == speaker:
                names = ", ".join(f"rank {r}" for r in ranks)
                host = self.read().get(ranks[0], {}).get("host", "?") if ranks else "?"
                print(
                    f"tritower: {names} made no progress for {self.timeout_s:g} s (train.hang_timeout_s; {why}; "
                    f"host {host}): stopping every rank at step {self.step}, exit code {REQUEUE_EXIT_CODE}; "
                    "--resume auto continues from the newest checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
            stop_process(REQUEUE_EXIT_CODE)


def stop_process(code: int) -> None:
    """End this process from a thread while its main thread is blocked (in a collective): record
    the code, end the data workers, run the exit handlers (run-folder lock, shm buffer) for at most
    10 s, then ``os._exit``."""
    import multiprocessing

    record_exit(code)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
    handlers = threading.Thread(target=atexit._run_exitfuncs, daemon=True)
    handlers.start()
    handlers.join(10)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
