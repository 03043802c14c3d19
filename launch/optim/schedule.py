"""The learning-rate schedule, one implementation for every optimizer and choice.

Linear warm-up over ``optim.warmup_steps`` (the first step at ``lr / warmup_steps``, as open_clip's
``assign_learning_rate``), then ``cosine`` or ``linear`` decay to ``lr * optim.min_lr_ratio``,
``constant``, or ``rsqrt`` (``1/sqrt(1 + t/timescale)``, big_vision's), then an optional linear
cooldown to 0 over the last ``optim.cooldown_steps``. It is a torch ``LambdaLR`` the engine steps
and checkpoints; DeepSpeed's own schedulers are not used (their warm-up starts two steps later).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from tritower.launch.optim.config import OptimConfig

if TYPE_CHECKING:  # torch is imported where the schedule is built: ds_config stays light to import
    import torch


def lr_factor(step: int, opt: OptimConfig, total_steps: int) -> float:
    """The schedule's factor of the peak ``lr`` at optimizer step ``step`` (0 = the first)."""
    warmup, cooldown = opt.warmup_steps, opt.cooldown_steps
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup - cooldown)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = opt.min_lr_ratio
    if opt.schedule == "cosine":
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif opt.schedule == "linear":
        factor = floor + (1 - floor) * (1 - progress)
    elif opt.schedule == "rsqrt":
        timescale = opt.rsqrt_timescale or max(1, warmup)
        factor = 1 / math.sqrt(1 + (step - warmup) / timescale)
    else:
        factor = 1.0
    if cooldown and step >= total_steps - cooldown:
        factor *= (total_steps - step) / cooldown
    return factor


def build_scheduler(
    opt: OptimConfig, total_steps: int
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """What ``deepspeed.initialize(lr_scheduler=...)`` calls with the optimizer it built."""

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, lambda step: lr_factor(step, opt, total_steps))

    return build


def describe_schedule(opt: OptimConfig) -> str:
    """The schedule in a few words (the start-up line)."""
    cooldown = f", cooldown {opt.cooldown_steps} steps" if opt.cooldown_steps else ""
    return f"schedule warm-up {opt.warmup_steps} steps + {opt.schedule}{cooldown}"
