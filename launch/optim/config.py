"""The ``optim`` section: the optimizer and its learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class OptimConfig:
    """The optimizer (AdamW, LAMB or Adafactor) and its learning-rate schedule (linear warm-up,
    then cosine, linear, constant or rsqrt, then an optional cooldown); see launch/optim/optimizers.py."""

    name: Literal["adamw", "lamb", "adafactor"] = "adamw"
    """``adamw`` (CLIP), ``lamb`` (EVA-CLIP; DeepSpeed's FusedLamb on CUDA, timm's Lamb elsewhere)
    or ``adafactor`` (LiT, big_vision: transformers' Adafactor with momentum ``beta1``)."""
    schedule: Literal["cosine", "linear", "constant", "rsqrt"] = "cosine"
    """After warm-up: ``cosine`` or ``linear`` decay to ``lr * min_lr_ratio``, ``constant``, or
    ``rsqrt`` (``1/sqrt(1 + t/rsqrt_timescale)``). One implementation for every choice
    (``launch/optim/optimizers.py: lr_factor``)."""
    cooldown_steps: int = 0
    """Linear cooldown of the learning rate to 0 over the last N steps (0: none)."""
    rsqrt_timescale: int = 0
    """``schedule=rsqrt``: steps after warm-up at which the rate is 1/sqrt(2) of the peak; 0 =
    ``warmup_steps``."""
    adafactor_clip_threshold: float = 1.0
    """``name=adafactor``: update clipping (RMS of an update capped at this; 0 disables)."""
    lr: float = 5e-4
    """Peak learning rate, reached at the end of warm-up."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; biases, norms and the temperature get none."""
    beta1: float = 0.9
    """AdamW/LAMB beta1; Adafactor's momentum (0: none)."""
    beta2: float = 0.98
    """AdamW/LAMB beta2 (0.98 as in CLIP, for stability at large batch); Adafactor ignores it
    (its second-moment decay is 1 - t^-0.8)."""
    eps: float = 1e-6
    """AdamW/LAMB epsilon."""
    warmup_steps: int = 30
    """Steps of linear warm-up from 0 to ``lr``."""
    min_lr_ratio: float = 0.0
    """Cosine decay ends at ``lr * min_lr_ratio``."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    unlock_warmup_steps: int = 0
    """Delayed unlocking (``model.*_unlock_after_steps``): steps of the unlocked tower's own linear
    learning-rate warm-up from 0, starting at its unlock step; 0 = ``warmup_steps``."""
