"""Atomic file writes: a reader (another rank, a resumed run, a crash's survivor) never sees half a
file. The one implementation for embeddings metadata, run files, configs and checkpoint pointers."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict) -> None:
    """``payload`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2))
