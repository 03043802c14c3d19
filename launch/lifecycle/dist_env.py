"""The one place that reads the rank environment variables set by launchers.

``deepspeed``, ``torchrun`` and SLURM wrappers all export RANK / LOCAL_RANK / WORLD_SIZE; a plain
``python launch/train.py`` has none of them and runs as a single rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int = 1
    """Ranks on this node (``LOCAL_WORLD_SIZE`` of torchrun, ``LOCAL_SIZE`` of DeepSpeed's launcher)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environ() -> DistEnv:
    """Read the launcher's variables, defaulting to a single process."""
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1"))),
    )


def ensure_single_process_defaults() -> None:
    """Let ``python launch/train.py`` work without a launcher: a world of one on a free port."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def check_master_port() -> None:
    """Rank 0 binds ``MASTER_PORT`` when it starts the process group; a port another process holds
    would fail only after the rendezvous timeout, with a traceback per rank. Probe it first.
    Skipped where a launcher's agent already holds the port (torchrun's store). OSError naming
    the port and the fix (a ``ConfigError``)."""
    port = os.environ.get("MASTER_PORT")
    if os.environ.get("RANK", "0") != "0" or not port or os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    import errno
    import socket

    from tritower.launch.config import ConfigError

    with socket.socket() as probe:
        # As the process group's store binds it: a port left in TIME_WAIT by the run before is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", int(port)))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                return
            raise ConfigError(
                f"master port {port} is already in use on this host (another run?): pass another --master_port "
                "to deepspeed (or set MASTER_PORT)"
            ) from None
