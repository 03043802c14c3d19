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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environ() -> DistEnv:
    """Read the launcher's variables, defaulting to a single process."""
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
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
