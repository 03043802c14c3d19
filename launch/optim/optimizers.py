"""The papers' optimizers and learning-rate schedules, as the DeepSpeed engine takes them.

``optim.name``:

* ``adamw`` (CLIP, open_clip): DeepSpeed builds it from the config (``launch/engine/ds_config.py``).
* ``lamb`` (EVA-CLIP): on CUDA DeepSpeed's own ``Lamb`` (``FusedLamb``, a CUDA op JIT-compiled on
  first use); off CUDA, where that op cannot build, timm's ``Lamb`` (the same update in PyTorch)
  as a client optimizer.
* ``adafactor`` (LiT, big_vision's default): transformers' ``Adafactor`` with big_vision's
  momentum (``optim.beta1``), a fixed learning rate (no relative step, no parameter scaling) and
  decoupled weight decay, as a client optimizer.

Client optimizers go to ``deepspeed.initialize(optimizer=...)`` with
``zero_allow_untested_optimizer``. Under ZeRO-1/2/3 every optimizer updates DeepSpeed's flat fp32
partitions, not the model's tensors: LAMB's trust ratio and Adafactor's update clipping are then
computed per partition, and Adafactor keeps a full (unfactored) second moment of each 1-D
partition. Under ZeRO-0 they are per tensor, as in the papers (docs/configuration.md).

``optim.schedule``: linear warm-up over ``optim.warmup_steps``, then ``cosine`` (to
``lr * optim.min_lr_ratio``), ``linear`` (the same end), ``constant`` or ``rsqrt``
(``1/sqrt(1 + t/timescale)``, big_vision's), then an optional linear cooldown to 0 over the last
``optim.cooldown_steps``. One function (``lr_factor``) is every schedule, stepped by the engine as
a torch ``LambdaLR`` (``Schedule``). Its warm-up and cosine are DeepSpeed's ``WarmupCosineLR``
(``warmup_type=linear``) float for float, which the default used to be: runs and checkpoints made
with it continue bit-exactly (``Schedule.load_state_dict`` reads its saved state).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from tritower.launch.optim.config import OptimConfig

if TYPE_CHECKING:  # torch is imported where an optimizer is built: ds_config stays light to import
    import torch
    from torch.optim.lr_scheduler import LRScheduler


def client_optimizer_needed(opt: OptimConfig, device_type: str) -> bool:
    """Whether the optimizer is built here (Adafactor; LAMB off CUDA) rather than by DeepSpeed."""
    return opt.name == "adafactor" or (opt.name == "lamb" and device_type != "cuda")


def build_client_optimizer(groups: list[dict], opt: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer over ``groups`` (each with its own ``lr`` and ``weight_decay``)."""
    if opt.name == "lamb":
        from timm.optim import Lamb

        # The engine clips the global gradient norm (optim.grad_clip); timm's own clipping is off.
        return Lamb(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, max_grad_norm=None)
    if opt.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups,
            lr=opt.lr,
            beta1=opt.beta1 or None,
            clip_threshold=opt.adafactor_clip_threshold,
            decay_rate=-0.8,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    raise ValueError(f"optim.name={opt.name!r} is built by DeepSpeed, not here")


def lr_factor(step: int, opt: OptimConfig, total_steps: int) -> float:
    """The schedule's factor of the peak ``lr`` for optimizer step ``step`` (0 = the first update).

    ``t = step - 1`` is DeepSpeed's ``WarmupCosineLR`` iteration count at that update (its first two
    updates run at 0): warm-up ``max(t, 0) / warmup_steps`` while ``t < warmup_steps``, then the decay
    over ``progress = (t - warmup_steps + 1) / (total_steps - warmup_steps - cooldown_steps)``,
    written in DeepSpeed's order of float operations, so the default is bit-identical to it."""
    warmup, cooldown = opt.warmup_steps, opt.cooldown_steps
    t = step - 1
    if warmup and t < warmup:
        return max(t, 0) / warmup
    progress = min(1.0, (t - warmup + 1) / max(1, total_steps - warmup - cooldown))
    floor = opt.min_lr_ratio
    if opt.schedule == "cosine":
        factor = max(0.0, floor + (1.0 - floor) * ((1 + math.cos(math.pi * progress)) / 2))
    elif opt.schedule == "linear":
        factor = floor + (1.0 - floor) * (1 - progress)
    elif opt.schedule == "rsqrt":
        timescale = opt.rsqrt_timescale or max(1, warmup)
        factor = 1 / math.sqrt(1 + (t - warmup + 1) / timescale)
    else:
        factor = 1.0
    if cooldown and step >= total_steps - cooldown:
        factor *= (total_steps - step) / cooldown
    return factor


def client_scheduler(
    opt: OptimConfig, total_steps: int
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
    """What ``deepspeed.initialize(lr_scheduler=...)`` calls with the optimizer it built."""

    def build(optimizer: torch.optim.Optimizer) -> LRScheduler:
        from torch.optim.lr_scheduler import LambdaLR

        class Schedule(LambdaLR):
            """``lr_factor`` as a LambdaLR. A checkpoint holds its position, not its peak: on load
            the peak ``lr`` of each group stays this run's (a resume with ``--optim.lr`` changed
            continues at the new rate, as the divergence advice asks). It also loads the state
            DeepSpeed's WarmupCosineLR saved (``{"last_batch_iteration": k}``: ``k + 1`` updates)."""

            def load_state_dict(self, state_dict: dict) -> None:
                state = {key: value for key, value in state_dict.items() if key != "base_lrs"}
                if "last_batch_iteration" in state and "last_epoch" not in state:
                    done = int(state["last_batch_iteration"]) + 1
                    state = {"last_epoch": done, "_step_count": done + 1, "lr_lambdas": [None]}
                super().load_state_dict(state)
                factor = lr_factor(self.last_epoch, opt, total_steps)
                self._last_lr = [base * factor for base in self.base_lrs]

        return Schedule(optimizer, lambda step: lr_factor(step, opt, total_steps))

    return build


def describe(opt: OptimConfig, device_type: str) -> str:
    """One line for the start of a run: which optimizer implementation and schedule."""
    if opt.name == "adafactor":
        which = "Adafactor (transformers, client optimizer)"
    elif opt.name == "lamb":
        which = "Lamb (DeepSpeed FusedLamb)" if device_type == "cuda" else "Lamb (timm, client optimizer: no CUDA)"
    else:
        which = "AdamW"
    schedule = f"warm-up {opt.warmup_steps} steps + {opt.schedule}"
    cooldown = f", cooldown {opt.cooldown_steps} steps" if opt.cooldown_steps else ""
    return f"optimizer {which}, schedule {schedule}{cooldown}"
