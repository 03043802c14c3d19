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
    alphas: str = ""
    """3T only: comma-separated mixing weights alpha in [0, 1] (e.g. ``0,0.25,0.5,0.75,1``) at
    which the alpha mixture of the main towers and the third tower is also evaluated
    (``evaluate_alphas``: metrics named ``zeroshot_top1@alpha=0.5``); "" = none."""

    def __post_init__(self) -> None:
        self.alpha_values()  # validates

    def alpha_values(self) -> list[float]:
        """``alphas`` parsed: a list of floats in [0, 1] (empty for "")."""
        values = []
        for item in self.alphas.split(","):
            if not item.strip():
                continue
            try:
                value = float(item)
            except ValueError:
                raise ValueError(f"eval.alphas={self.alphas!r}: {item.strip()!r} is not a number") from None
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"eval.alphas={self.alphas!r}: {value} is outside [0, 1]")
            values.append(value)
        return values
