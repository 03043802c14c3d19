"""Configuration of evaluation (the ``eval`` section)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    """Zero-shot classification and retrieval on the held-out split."""

    every_steps: int = 100
    """Evaluate every N optimizer steps (0: only at the end)."""
    at_end: bool = True
    """Evaluate once more after the last step."""
    batch_size: int = 256
    """Images or captions encoded per forward pass during evaluation."""
    max_samples: int = 0
    """Cap on held-out samples used (0: all)."""
