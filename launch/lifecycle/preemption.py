"""How a run stops early: stop signals, a launcher that went away, and the exit codes.

SIGUSR1, SIGTERM and SIGINT (Ctrl-C) only set a flag. The trainer checks it after every step,
agrees across ranks (one rank may get the signal first, or alone), writes a checkpoint on every
rank and exits with ``REQUEUE_EXIT_CODE``; ``launch/slurm/*.sbatch`` requeue the job on that code
and the requeued job resumes by itself (``--resume auto``). A second Ctrl-C interrupts at once.

Signals sent to the ``deepspeed`` command or to its per-node launcher do not all reach the ranks:
the command (``deepspeed.launcher.runner``) installs no handler on one node, so SIGTERM or SIGUSR1
ends it at once, and the launcher (``deepspeed.launcher.launch``) dies of SIGUSR1 and answers
SIGTERM/SIGINT by sending SIGTERM to the ranks, SIGKILL 30 s later, then exits 1. So every rank
also watches its ancestors (``LauncherWatch``): when its launcher, or the ``deepspeed`` command
above it, is gone, the rank stops exactly as for a signal. The exit status those processes report
is still DeepSpeed's; ``launch/lifecycle/supervise.py`` runs the command so that the status a scheduler reads
is the ranks' own (each rank records it with ``record_exit``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
CONFIG_EXIT_CODE = 2  # a configuration, input-file, run-folder or resume problem: fix and re-run
DIVERGED_EXIT_CODE = 3  # too many non-finite losses in a row: resume the named checkpoint, lower lr

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
EXIT_DIR_VARIABLE = "TRITOWER_EXIT_DIR"
"""Set by ``launch/lifecycle/supervise.py``: the folder where every rank records its exit code."""


def record_exit(code: int) -> None:
    """Write this rank's exit code (and the world size) to ``$TRITOWER_EXIT_DIR/rank<N>``, where
    ``launch/lifecycle/supervise.py`` reads every rank's: the launchers above the ranks lose it after a
    signal. Nothing without the variable."""
    folder = os.environ.get(EXIT_DIR_VARIABLE)
    if folder:
        rank, world_size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
        with contextlib.suppress(OSError):  # the supervisor is gone: nobody to tell
            Path(folder, f"rank{rank}").write_text(f"{code} {world_size}\n")


def exit_rank(code: int) -> NoReturn:
    """End this rank with ``code`` without the interpreter's teardown of C++ objects.

    A rank that leaves while gloo's threads are still alive can abort in that teardown ("terminate
    called without an active exception", SIGABRT), turning exit 2 or 0 into -6: CI saw it on a
    finished 2-rank run and on a resume refused with exit 2 on both ranks. So every exit:
    kills the data workers still alive (they ignore SIGTERM, and multiprocessing's exit handler
    would SIGTERM them and wait forever), destroys the process group (locally, no barrier: after an
    error a rank may be alone; a finished run met its barrier already), runs the ``atexit`` handlers
    (run-folder lock, /dev/shm buffer, logging, wandb), flushes the console and ends with
    ``os._exit``, which skips that teardown.
    """
    import multiprocessing

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise for the killed workers
    for child in multiprocessing.active_children():
        if child.daemon:  # data workers; a preemption's SIGTERM must not kill them, so they ignore it
            child.kill()
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        with contextlib.suppress(Exception):  # a broken group: the exit matters more than its teardown
            distributed.destroy_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


RANK_MESSAGE_DELAY_S = 10.0


def say_setup_error(rank: int, message: str) -> None:
    """Print a setup error once per job, whichever ranks meet it.

    Every rank usually meets the same check and fails the same way, so rank 0 prints the line at
    once. Any other rank waits first: when rank 0 failed too, the launcher (``deepspeed``, torchrun,
    ``srun --kill-on-bad-exit``) ends this rank as soon as rank 0 exits, and the job shows one line;
    when this rank failed alone (a file missing on its node only), nobody else will say why, so it
    prints the line itself, naming its rank.
    """
    if rank == 0:
        print(f"tritower: {message}", file=sys.stderr, flush=True)
        return
    time.sleep(RANK_MESSAGE_DELAY_S)
    print(f"tritower: rank {rank}: {message}", file=sys.stderr, flush=True)


def _parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc (Linux), or None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1])


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LauncherWatch:
    """Notices that this rank's launcher went away: its parent pid changed (the launcher died and
    the rank was re-parented) or, under ``deepspeed``, the launcher's own parent (the ``deepspeed``
    command) changed. Two /proc reads a step; where /proc is missing only ``os.getppid`` is used."""

    def __init__(self) -> None:
        self.parent = os.getppid()
        self.grandparent = None
        if "deepspeed.launcher.launch" in _command_line(self.parent):
            self.grandparent = _parent_of(self.parent)

    def gone(self) -> str:
        """ "" while the launcher is there, else what went away."""
        if os.getppid() != self.parent:
            return f"launcher (pid {self.parent}) gone"
        if self.grandparent is not None and _parent_of(self.parent) not in (self.grandparent, None):
            return f"deepspeed command (pid {self.grandparent}) gone"
        return ""


class StopRequest:
    """Remembers whether a stop signal arrived (or the launcher went away); installs itself for
    SIGUSR1, SIGTERM and SIGINT."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signal_name = ""
        self.immediate = True
        """Until the loop starts (the trainer clears it) a stop signal exits at once with
        REQUEUE_EXIT_CODE: nothing new to save yet, and a rank the launcher terminates because
        another rank failed leaves quietly instead of waiting on that rank in a collective."""
        self.watch = LauncherWatch()
        for number in signals:
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: object) -> None:
        if self.immediate:
            raise Preempted()
        if number == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signal_name = signal.Signals(number).name

    def poll(self) -> bool:
        """Whether to stop: a signal arrived, or the launcher is gone (checked now)."""
        if not self.signal_name:
            self.signal_name = self.watch.gone()
        return bool(self.signal_name)

    @property
    def requested(self) -> bool:
        return bool(self.signal_name)


def ignore_stop_signals() -> None:
    """Once a rank stops with its checkpoint written, further stop signals are ignored: when the
    first rank exits 75, ``srun --kill-on-bad-exit`` and DeepSpeed's launcher send SIGTERM to the
    others, and one arriving while the interpreter shuts down (Python handlers gone) would turn
    their 75 into 143, which srun reports as the step's status and no script requeues on."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with REQUEUE_EXIT_CODE.

    ``agreed``: every rank decided to stop at the same step (so all of them can meet once more to
    close the process group); False for a signal before the loop, which a rank takes alone."""

    def __init__(self, agreed: bool = False) -> None:
        super().__init__(REQUEUE_EXIT_CODE)
        self.agreed = agreed


class EvalFailed(SystemExit):
    """Raised at the end of a run (its checkpoint and metrics.json written, its line printed) when
    an evaluation failed on bad eval input: exit code 2, fix the set and evaluate the checkpoint."""

    def __init__(self) -> None:
        super().__init__(CONFIG_EXIT_CODE)


class AlreadyFinished(SystemExit):
    """Raised (after its line is printed) when ``--resume`` names a run that already finished:
    exit code 0, nothing trained or written (a requeued job of a finished run ends here)."""

    def __init__(self) -> None:
        super().__init__(0)


class Diverged(SystemExit):
    """Raised (after its message is printed) when too many losses in a row were non-finite."""

    def __init__(self) -> None:
        super().__init__(DIVERGED_EXIT_CODE)
