"""Atomic file writes: a reader (another rank, a resumed run, a crash's survivor) never sees half a
file. The one implementation for embeddings metadata, run files, configs and checkpoint pointers."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def process_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` can only set it, and setting it
    even for an instant would let another thread create files with the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: the only other way
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``. The file
    gets the mode any other file of the run gets (0666 less the umask): ``mkstemp`` makes it 0600,
    which teammates and monitoring on a shared cluster could not read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~process_umask())
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def strict_json(value: object) -> object:
    """``value`` with every non-finite float (NaN, inf) as None: JSON has no NaN, and strict readers
    (``jq``, JavaScript, Go) refuse Python's bare ``NaN``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_json_atomic(path: Path, payload: dict) -> None:
    """``payload`` as indented strict JSON (non-finite floats as null), atomically."""
    write_text_atomic(path, json.dumps(strict_json(payload), indent=2, allow_nan=False))
