"""What a run writes besides checkpoints: the metrics file, the curves figure, the wandb run and the
run folder's lock (rank 0 only)."""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tritower.launch.config import TrainConfig


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


FULL_BELOW_BYTES = 64 << 20
"""A failed write with less than this free on its file system is taken for a full disk: torch.save
reports a full disk without an errno ("unexpected pos ...", from "basic_ios::clear: iostream error")."""


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error``, raised while writing under ``folder``, comes from a full disk (or quota)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, OSError | RuntimeError):
        return False
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return False
    return usage.free < FULL_BELOW_BYTES


def full_disk_error(folder: Path, what: str) -> OSError:
    """The one-line ENOSPC error of a save that met a full disk."""
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    return OSError(
        errno.ENOSPC,
        f"disk full (ENOSPC) while writing {what} ({free / 2**20:.1f} MiB free): free space there or pass another "
        "--train.output_dir; every checkpoint written before is intact and --resume auto continues from the newest",
        str(folder),
    )


def write_curves(run_dir: Path, enabled: bool) -> None:
    """``log.curves``: draw the run's curves from its ``train_log.jsonl`` to ``<run>/curves.png``
    (global rank 0, at the end). A figure is a convenience: any failure to draw it is one warning
    line, never a failed run after the training and its checkpoint are done."""
    if not enabled:
        return
    try:
        from tritower.launch.metrics.curves import draw_curves

        print(f"curves: {draw_curves([run_dir], run_dir / 'curves.png')}", flush=True)
    except Exception as error:  # anything at all: the run itself has succeeded
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        print(f"warning: could not draw {run_dir / 'curves.png'} ({message}); the run is fine", file=sys.stderr)


def check_wandb_login(mode: str) -> None:
    """``wandb.mode=online`` needs an API key (``WANDB_API_KEY``, or ``wandb login``'s netrc
    entry); without one wandb would stop the run after the towers were built, or wait for input.
    RuntimeError naming the fix."""
    if mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if netrc.netrc(path).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise RuntimeError(
        f"wandb.mode=online needs a W&B API key and none is set (no WANDB_API_KEY, no {host} entry in {path}): "
        "run `wandb login` or set WANDB_API_KEY, or pass --wandb.mode=offline (sync later with `wandb sync`)"
    )


class WandbLogger:
    """wandb on global rank 0; a no-op elsewhere or with ``--wandb.mode=disabled``.

    Logging is a convenience: once wandb fails (its service process died, from the same signal
    that preempts the run, or a lost connection), ``log`` and ``finish`` print one warning and the
    logger turns itself off, so no stop path (75, 3) or finished run (0) changes its exit code.
    wandb's own exit hook, which would fail the same way, is removed with it (``wandb.teardown``
    unregisters it first)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, enabled: bool, run_id: str | None = None) -> None:
        """``run_id`` comes from the checkpoint on resume, so the resumed run continues the same
        wandb run (``resume="allow"``); a sweep agent's ``WANDB_RUN_ID`` wins when set."""
        self.run = None
        if not enabled or cfg.wandb.mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity or None,
            name=run_dir.name,
            dir=str(run_dir),
            mode=cfg.wandb.mode,
            config=cfg.to_dict(),
            reinit="finish_previous",
            id=os.environ.get("WANDB_RUN_ID") or run_id,
            resume="allow",
        )

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, values: dict, step: int) -> None:
        if self.run is not None:
            self._safely("log", lambda: self.run.log(values, step=step))

    def finish(self, summary: dict) -> None:
        def finish() -> None:
            for key, value in summary.items():
                self.run.summary[key] = value
            self.run.finish()

        if self.run is not None:
            self._safely("finish", finish)
            self.run = None

    def _safely(self, what: str, action: object) -> None:
        try:
            action()
        except Exception as error:  # anything wandb raises: the run must not fail for its logger
            import wandb

            message = f"{type(error).__name__}: {error}".splitlines()[0]
            print(
                f"tritower: warning: wandb {what} failed ({message}); wandb logging is off for the rest of this "
                "process, the run itself is unaffected (train_log.jsonl has every value)",
                file=sys.stderr,
                flush=True,
            )
            self.run = None
            with contextlib.suppress(Exception):
                wandb.teardown()  # unregisters wandb's exit hook, which would raise the same error


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
        taken = ""
        for _ in range(2):
            try:
                self._create()
            except FileExistsError:
                other = self._read()
                if not self._stale(other):
                    raise RuntimeError(
                        f"run folder {self.path.parent} is in use by another run (pid {other.get('pid')} on host "
                        f"{other.get('host')}, since {other.get('since')}): wait for it to end, or pass another "
                        f"--train.run_name; if that run is gone, delete {self.path}"
                    ) from None
                self.path.unlink(missing_ok=True)
                taken = f"took over the stale lock of pid {other.get('pid')} on {other.get('host')} ({self.path})"
                continue
            atexit.register(self.release)
            return taken
        raise RuntimeError(f"could not take {self.path}: another run started at the same moment")

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
