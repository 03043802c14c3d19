"""Checkpoints through the DeepSpeed engine, written so that nothing saved is ever lost.

Layout of ``<run>/checkpoints/``::

    step00000400/        one DeepSpeed tag (every rank's shards + the trainer's client state)
    step00000400/keep    marker: never pruned
    latest               names the newest complete tag

A save writes a temporary tag (``step00000600.partial``) on every rank, waits until every rank
has finished, renames it (one atomic rename by rank 0) and only then rewrites ``latest``
atomically. A process killed at any moment therefore leaves ``latest`` pointing at a complete
checkpoint. Old tags beyond the last ``keep_last`` are removed, except those marked ``keep``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tritower.launch.run_io import write_text_atomic

TAG_PATTERN = re.compile(r"^step(\d{8})$")
PARTIAL_SUFFIX = ".partial"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state(device: torch.device) -> dict:
    """This rank's random generators, so a resumed run draws the same numbers."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_per_rank(value: object) -> list:
    """Every rank's ``value`` in rank order (a collective: all ranks call it)."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def complete_tags(folder: Path) -> list[str]:
    """Finished tags, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))


def save(engine, folder: Path, step: int, client_state: dict, *, keep_last: int, keep: bool = False) -> str:
    """Write tag ``step`` from every rank; returns the tag once ``latest`` points at it."""
    tag = tag_for(step)
    partial = tag + PARTIAL_SUFFIX
    is_main = dist.get_rank() == 0
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder / partial, ignore_errors=True)  # a leftover of a killed save
    dist.barrier()
    engine.save_checkpoint(str(folder), tag=partial, client_state=client_state, save_latest=False)
    if os.environ.get("TRITOWER_FAULT_KILL_IN_SAVE") == str(step):
        # Fault injection for tests: die like a preempted node in the middle of a save.
        os.kill(os.getpid(), 9)
    dist.barrier()  # every rank's shards are on disk before the tag becomes visible
    if is_main:
        if (folder / tag).exists():  # saving the same step twice (e.g. end right after a periodic save)
            shutil.rmtree(folder / tag)
        os.replace(folder / partial, folder / tag)
        if keep:
            (folder / tag / "keep").touch()
        write_text_atomic(folder / "latest", tag)
        prune(folder, keep_last)
    dist.barrier()
    return tag


def prune(folder: Path, keep_last: int) -> list[str]:
    """Remove complete tags older than the newest ``keep_last``, sparing those marked ``keep``."""
    if keep_last <= 0:
        return []
    tags = complete_tags(folder)
    removed = []
    for tag in tags[:-keep_last]:
        if not (folder / tag / "keep").exists():
            shutil.rmtree(folder / tag, ignore_errors=True)
            removed.append(tag)
    return removed


def resolve_resume(resume: str, checkpoints: Path) -> tuple[Path, str] | None:
    """Where to resume from: ``auto`` (this run's latest, if any), a checkpoints folder, or a tag.

    Returns (checkpoints folder, tag), or None to start fresh (``auto`` with nothing saved).
    """
    if not resume:
        return None
    target = checkpoints if resume == "auto" else Path(resume).expanduser()
    if (target / "latest").is_file():
        tag = (target / "latest").read_text().strip()
        if not (target / tag).is_dir():
            raise FileNotFoundError(f"{target / 'latest'} names {tag}, which is missing: pass --resume with one of {complete_tags(target)}")
        return target, tag
    if TAG_PATTERN.match(target.name) and target.is_dir():
        return target.parent, target.name
    if resume == "auto":
        return None
    raise FileNotFoundError(
        f"no checkpoint at {resume}: pass a run's checkpoints folder (holding 'latest'), one of its "
        "step folders, or --resume auto"
    )


def load(engine, folder: Path, tag: str) -> dict:
    """Load model, optimizer and scheduler state on every rank; returns the trainer's client state."""
    load_path, client_state = engine.load_checkpoint(str(folder), tag=tag)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load tag {tag} from {folder}")
    return client_state or {}
