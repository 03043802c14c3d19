"""Run the ``deepspeed`` command so that its exit status says what the ranks did:

    python -m tritower.launch.lifecycle.supervise deepspeed --num_gpus 8 launch/train.py --zero zero_configs/z3.json ...

It exits 75 (``REQUEUE_EXIT_CODE``) when a stop signal made every rank checkpoint and exit 75.
``deepspeed`` alone cannot: after SIGTERM/SIGINT its per-node launcher (``deepspeed.launcher.launch``)
terminates the ranks and exits 1 whatever they returned, SIGUSR1 kills it, and on one node the
command (``deepspeed.launcher.runner``) has no handler at all: SIGTERM/SIGUSR1 end it at once
(143/138), SIGINT with a ``KeyboardInterrupt`` (130). The ranks stop cleanly in every case
(``preemption.LauncherWatch``); only the status the scheduler reads is lost.

How:
- every rank writes its exit code to ``$TRITOWER_EXIT_DIR/rank<N>`` (``preemption.record_exit``);
  this process sets that folder, and exits with the ranks' code when every rank wrote one
  (75 if any stopped for a signal and none failed; a failure's own code), else with the command's;
- the command runs in its own session, so a terminal's Ctrl-C reaches this process only, and
  SIGTERM, SIGUSR1 and SIGINT sent here go to the ranks themselves (the children of each launcher),
  not to the command or the launcher, which then pass the ranks' 75 on by themselves;
- it is the child subreaper of everything below it (``PR_SET_CHILD_SUBREAPER``): when someone
  signals the command or a launcher directly, it still waits for the orphaned ranks' exit; and
  should it die, the command gets SIGTERM (``PR_SET_PDEATHSIG``) and the ranks stop as when their
  launcher goes away.

Linux only (``prctl``, ``/proc``); one node (the launchers of other nodes run elsewhere: there, use
``srun`` as ``launch/slurm`` does).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tritower.launch.lifecycle.preemption import EXIT_DIR_VARIABLE, REQUEUE_EXIT_CODE, STOP_SIGNALS

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
LAUNCHER = "deepspeed.launcher.launch"
RANKS_WAIT_S = 30.0
"""A signal that arrives before the ranks exist waits this long for them, then goes to the command."""


def _prctl(option: int, value: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")


def find_ranks(root: int) -> set[int]:
    """The ranks below ``root`` or this process: children of a DeepSpeed launcher (one that lost
    its ``deepspeed`` command is re-parented here)."""
    table = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            table[int(entry.name)] = (parent, (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue  # not a process, or gone meanwhile
    below, frontier = set(), {root, os.getpid()}
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier and pid not in below}
        below |= frontier
    launchers = {pid for pid in below if LAUNCHER in table[pid][1]}
    return {pid for pid in below if table[pid][0] in launchers}


def ranks_exit_code(folder: Path) -> int | None:
    """The ranks' common exit status from what each wrote in ``folder`` (``code world_size``), or
    None unless every rank wrote one: 75 when some stopped for a signal and none failed, the
    largest failure code when one failed, 0 when all finished."""
    written = [path.read_text().split() for path in folder.glob("rank*")]
    if not written or len(written) != int(written[0][1]):
        return None
    codes = {int(code) for code, _ in written}
    failed = codes - {0, REQUEUE_EXIT_CODE}
    return max(failed) if failed else max(codes)


def supervise(command: list[str], poll_s: float = 0.5) -> int:
    """Run ``command`` (a ``deepspeed ...`` command line) and everything it starts to their end;
    returns the exit status to report."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    pending: list[tuple[int, float]] = []
    for number in STOP_SIGNALS:
        signal.signal(number, lambda number, frame: pending.append((number, time.time())))
    with tempfile.TemporaryDirectory(prefix="tritower-exit-") as folder:
        child = subprocess.Popen(
            command,
            env=dict(os.environ, **{EXIT_DIR_VARIABLE: folder}),
            start_new_session=True,
            preexec_fn=lambda: _prctl(PR_SET_PDEATHSIG, signal.SIGTERM),
        )
        command_status, ranks = None, set()
        while True:
            ranks = find_ranks(child.pid) or ranks
            # Signals are passed on here, not in the handler: /proc reads are not signal-safe.
            while pending and (ranks or command_status is not None or time.time() - pending[0][1] > RANKS_WAIT_S):
                number, _ = pending.pop(0)
                for pid in ranks or ({child.pid} if command_status is None else set()):
                    try:
                        os.kill(pid, number)
                    except ProcessLookupError:
                        pass
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break  # the command and everything re-parented here are gone
            if pid == child.pid:
                command_status = os.waitstatus_to_exitcode(raw)
                command_status = 128 - command_status if command_status < 0 else command_status
            if not pid:
                time.sleep(poll_s)
        child.returncode = command_status  # reaped above: keep Popen from waiting again
        from_ranks = ranks_exit_code(Path(folder))
    return from_ranks if from_ranks is not None else command_status


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    return supervise(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
