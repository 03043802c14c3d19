"""The run folder's lock: one run at a time in a run folder (rank 0 holds it)."""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time
from pathlib import Path


def _start_time(pid: int) -> str:
    """A process's start time (clock ticks since boot, from /proc): with the pid, it names one
    process even after the pid is reused; "" where /proc is missing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not start or _start_time(pid) in ("", start)


class RunLock:
    """``<run>/lock``: one run at a time in a run folder. Rank 0 holds it (pid, host, start time,
    SLURM job id) for the life of its process and removes it at exit. A lock whose holder is
    gone is taken over: a dead pid on this host, or the same SLURM job (a requeued job may run
    on another node after its first run was killed)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "lock"
        self.holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _start_time(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def acquire(self) -> str:
        """Take the lock; returns a warning when a stale lock was taken over ("" otherwise).
        RuntimeError naming the holder when another live run holds it."""
        try:
            self._create()
        except FileExistsError:
            taken = self._take_over()
        else:
            taken = ""
        atexit.register(self.release)
        return taken

    def _take_over(self) -> str:
        """Replace a stale lock by this run's, under ``.lock.takeover`` (``flock``: released by the
        kernel when its holder dies, so it is never stale itself). Without it, contenders that all
        read the same stale lock each removed it and each created their own: two ran."""
        with open(self.path.with_name(".lock.takeover"), "a") as mutex:
            fcntl.flock(mutex, fcntl.LOCK_EX)
            while True:
                try:
                    other = json.loads(self.path.read_text())
                except FileNotFoundError:  # its holder ended meanwhile: take it as a fresh run does
                    try:
                        self._create()
                        return ""
                    except FileExistsError:
                        continue
                except (OSError, ValueError):
                    other = {}  # half-written or unreadable: its writer died at once
                break
            if not self._stale(other):
                raise RuntimeError(
                    f"run folder {self.path.parent} is in use by another run (pid {other.get('pid')} on host "
                    f"{other.get('host')}, since {other.get('since')}): wait for it to end, or pass another "
                    f"--train.run_name; if that run is gone, delete {self.path}"
                )
            # Only a holder of the mutex replaces a lock that exists; a fresh run's hard link
            # (``_create``) cannot succeed while it exists.
            own = self.path.with_name(f".lock.{os.getpid()}.tmp")
            own.write_text(json.dumps(self.holder))
            os.replace(own, self.path)
        return f"took over the stale lock of pid {other.get('pid')} on {other.get('host')} ({self.path})"

    def _create(self) -> None:
        """Create the lock whole: its content goes to a file of this process first, which is then
        hard-linked to the lock's name (FileExistsError if it exists). A lock created empty and
        filled after (``O_EXCL``) is seen half-written by a run starting at the same instant, which
        took it for a dead writer's and took it over: four runs started together all ran.
        ``O_EXCL`` remains the fallback where the file system has no hard links."""
        own = self.path.with_name(f".lock.{os.getpid()}.tmp")
        own.write_text(json.dumps(self.holder))
        try:
            os.link(own, self.path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(handle, "w") as out:
                json.dump(self.holder, out)
        finally:
            own.unlink(missing_ok=True)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # half-written or unreadable: its writer died at once

    def _stale(self, other: dict) -> bool:
        if not other:
            return True
        if other.get("slurm_job") and other["slurm_job"] == self.holder["slurm_job"]:
            return True
        if other.get("host") != self.holder["host"]:
            return False
        pid = int(other.get("pid", 0))
        return pid <= 0 or not _alive(pid, str(other.get("start", "")))

    def release(self) -> None:
        other = self._read()
        if (other.get("pid"), other.get("host")) == (self.holder["pid"], self.holder["host"]):
            self.path.unlink(missing_ok=True)
