"""A full disk told apart from other write failures, and the one line a save that met one ends with."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

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
