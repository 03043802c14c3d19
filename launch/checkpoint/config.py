"""The ``checkpoint`` section: saving, retention and resuming."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    """Saving and loading DeepSpeed checkpoints."""

    save_at_end: bool = True
    """Write a checkpoint (all ranks, through the engine) after the last step."""
    every_steps: int = 0
    """Also checkpoint every N optimizer steps (0: off)."""
    every_minutes: float = 0.0
    """Also checkpoint when this many minutes passed since the last one (0: off); rank 0's clock
    decides for all ranks."""
    keep_last: int = 3
    """Keep the newest K checkpoints; older ones are deleted unless marked keep (0: keep all)."""
    keep_every_steps: int = 0
    """Mark checkpoints at multiples of N steps as keep: never deleted (0: none)."""
    resume: str = ""
    """``--resume auto``: continue from this run's newest complete checkpoint (one cut short or
    missing files is skipped with a warning; none: start fresh); ``--resume PATH``: a run's
    ``checkpoints`` folder (its ``latest``) or one step folder in it."""
