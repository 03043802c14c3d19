"""The training configuration: one typed dataclass per concern, and the checks across sections.

A run is an experiment name (a function in ``launch/experiments.py`` returning a ``TrainConfig``)
plus ``--section.field=value`` overrides (parsed by ``launch/cli.py``), the form wandb sweep agents
pass. ``validate`` runs every check before anything is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

from tritower.data.config import DataConfig
from tritower.evaluation.config import EvalConfig
from tritower.losses.config import LossConfig
from tritower.model.config import ModelConfig


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the problem and the fix."""


def closest(name: str, options: list[str]) -> str:
    """`` (did you mean 'X'?)`` for the option closest to a misspelt ``name``; "" for none."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


@dataclass
class OptimConfig:
    """The optimizer (AdamW, LAMB or Adafactor) and its learning-rate schedule (linear warm-up,
    then cosine, linear, constant or rsqrt, then an optional cooldown); see launch/optimizers.py."""

    name: str = "adamw"
    """``adamw`` (CLIP), ``lamb`` (EVA-CLIP; DeepSpeed's FusedLamb on CUDA, timm's Lamb elsewhere)
    or ``adafactor`` (LiT, big_vision: transformers' Adafactor with momentum ``beta1``)."""
    schedule: str = "cosine"
    """After warm-up: ``cosine`` or ``linear`` decay to ``lr * min_lr_ratio``, ``constant``, or
    ``rsqrt`` (``1/sqrt(1 + t/rsqrt_timescale)``). AdamW + cosine without cooldown is DeepSpeed's
    WarmupCosineLR; every other combination a torch LambdaLR passed to the engine."""
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


@dataclass
class TrainLoopConfig:
    """Length of the run, seeding and progress output."""

    steps: int = 200
    """Optimizer steps in the run."""
    seed: int = 0
    """Seed for model initialisation, data order and augmentation."""
    max_nonfinite_in_row: int = 5
    """A NaN/Inf loss skips its step and is counted; this many in a row checkpoint and stop."""
    hang_timeout_s: float = 1800.0
    """Hang watchdog: a rank that finishes no step for this long (4 times as long inside an
    evaluation or a checkpoint write) stops every rank with exit code 75 and one line naming it (launch/watchdog.py);
    0 = off. Counted from the end of the first step (which may compile kernels)."""
    collapse_warn_steps: int = 20
    """Warn once when this many steps in a row are collapsed: loss within 1e-3 of ln(batch) or
    logit scale below 0.01 (the health rule, docs/training.md); such steps never prove a
    checkpoint good."""
    micro_batch_size: int = 0
    """Per-rank micro-batch for exact accumulation (GradCache): each rank's share of
    ``data.batch_size`` is encoded in pieces of this size, keeping every negative of the global
    batch at the activation memory of one piece. 0 = the whole per-rank batch at once."""
    coalesce_grad_reduction: bool = False
    """With GradCache micro-batches under ZeRO-2/3: keep each micro-batch's gradients on the rank
    and reduce-scatter them once per optimizer step (DeepSpeed's ``engine.coalesce_grad_reduction``,
    0.19.1+) instead of at every micro-batch's backward. M times fewer gradient bytes on the wire
    for one unpartitioned gradient copy per rank, and the one reduction no longer overlaps the
    backward; see docs/gpu.md for the measurement and the default. Ignored where it changes
    nothing (ZeRO-0/1 reduce once per step already) or where DeepSpeed does not support it."""
    log_every: int = 10
    """Print a progress line (and log to wandb) every N steps."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    run_name: str = ""
    """Run folder name under ``output_dir`` ("" = experiment name)."""
    compile: str = ""
    """``torch.compile`` the towers in the engine (``nn.Module.compile``: parameter names and
    checkpoints unchanged) with this backend: ``inductor`` (kernels; minutes of compilation on a
    CPU), ``aot_eager`` or ``eager`` (graph capture only, for checking); "" = off."""


@dataclass
class DeepSpeedConfig:
    """Which ZeRO policy file to use and the numeric precision of training."""

    zero: str = "zero_configs/z3.json"
    """ZeRO/precision policy JSON (``--zero`` on the command line). Relative paths are tried
    from the working directory, then from the installed package."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (fp16 uses dynamic loss scaling; GPUs only)."""
    use_apex: bool = True
    """Use NVIDIA apex's fused LayerNorm where apex is installed and the run is on CUDA."""


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
    """``--resume auto``: continue from this run's ``latest`` (or start fresh when there is none);
    ``--resume PATH``: a run's ``checkpoints`` folder (its ``latest``) or one step folder in it."""


@dataclass
class WandbConfig:
    """Weights & Biases logging (global rank 0 only)."""

    mode: str = "offline"
    """``online``, ``offline`` (local run files, no network needed) or ``disabled``."""
    project: str = "tritower"
    """wandb project."""
    entity: str = ""
    """wandb entity (team or user); "" = the default."""


@dataclass
class LogConfig:
    """Local logs beside wandb, through DeepSpeed's own monitors (global rank 0 writes them)."""

    tensorboard: bool = False
    """Write TensorBoard event files to ``<run folder>/tensorboard/`` (``tensorboard --logdir runs``):
    the ``train/`` values of every logged step, and DeepSpeed's ``Train/Samples/lr`` every step."""
    csv: bool = False
    """Write the same values as CSV files, one per value, to ``<run folder>/csv/``."""
    curves: bool = True
    """At the end of a run, draw its curves (loss, learning rate, logit scale, each eval metric
    against step) from ``train_log.jsonl`` to ``<run folder>/curves.png`` (``launch/tools/report.py``;
    global rank 0; a failure to draw is a warning, never a failed run)."""


@dataclass
class TrainConfig:
    """Everything a run needs, one section per concern."""

    experiment: str = "clip_tiny"
    """Name of the experiment the config came from (informational once built)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Closed sets of the launch-owned sections; model/data/loss/eval validate themselves.
CHOICES = {
    "optim.name": ("adamw", "lamb", "adafactor"),
    "optim.schedule": ("cosine", "linear", "constant", "rsqrt"),
    "train.compile": ("", "inductor", "aot_eager", "eager"),
    "deepspeed.precision": ("fp32", "bf16", "fp16"),
    "wandb.mode": ("online", "offline", "disabled"),
}


def validate(cfg: TrainConfig) -> None:
    """Checks that need several fields or a closed set of values; run before anything is built.

    Overrides are set after construction, so each section's own ``__post_init__`` check (the
    model, data and loss configs have one) runs again here on the final values.
    """
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value) and hasattr(value, "__post_init__"):
            try:
                value.__post_init__()
            except ValueError as error:
                raise ConfigError(f"{section.name}: {error}") from None
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}")
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "train.steps": cfg.train.steps,
        "train.log_every": cfg.train.log_every,
        "model.embed_dim": cfg.model.embed_dim,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if not math.isfinite(cfg.optim.lr) or cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be a positive finite number, got {cfg.optim.lr}")
    _validate_ranges(cfg)
    if cfg.train.micro_batch_size < 0:
        raise ConfigError(f"train.micro_batch_size must be >= 0, got {cfg.train.micro_batch_size}")
    if cfg.optim.warmup_steps < 0 or cfg.eval.every_steps < 0:
        raise ConfigError("optim.warmup_steps and eval.every_steps must be >= 0")
    if cfg.optim.cooldown_steps < 0 or cfg.optim.rsqrt_timescale < 0:
        raise ConfigError("optim.cooldown_steps and optim.rsqrt_timescale must be >= 0")
    if cfg.optim.warmup_steps + cfg.optim.cooldown_steps > cfg.train.steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} + optim.cooldown_steps={cfg.optim.cooldown_steps} "
            f"exceed train.steps={cfg.train.steps}"
        )
    _validate_three_towers(cfg)


def _validate_ranges(cfg: TrainConfig) -> None:
    """Numbers that torch or the checkpointer would take and fail on later (or silently misuse),
    and a run name that would put the run folder outside ``train.output_dir``."""
    o, c = cfg.optim, cfg.checkpoint
    for key, value in {"optim.beta1": o.beta1, "optim.beta2": o.beta2}.items():
        if not 0 <= value < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    finite = {"optim.eps": o.eps, "optim.weight_decay": o.weight_decay, "optim.grad_clip": o.grad_clip}
    finite |= {"optim.min_lr_ratio": o.min_lr_ratio, "checkpoint.every_minutes": c.every_minutes}
    finite |= {"train.hang_timeout_s": cfg.train.hang_timeout_s}
    for key, value in finite.items():
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key} must be a finite number >= 0, got {value}")
    counts = {"checkpoint.every_steps": c.every_steps, "checkpoint.keep_last": c.keep_last}
    for key, value in (counts | {"checkpoint.keep_every_steps": c.keep_every_steps}).items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0: off), got {value}")
    if cfg.train.collapse_warn_steps < 1:
        raise ConfigError(f"train.collapse_warn_steps must be >= 1, got {cfg.train.collapse_warn_steps}")
    if cfg.train.max_nonfinite_in_row < 1:
        raise ConfigError(
            f"train.max_nonfinite_in_row must be >= 1 (non-finite losses in a row that stop the run), "
            f"got {cfg.train.max_nonfinite_in_row}"
        )
    name = cfg.train.run_name
    if name and (name in (".", "..") or "/" in name or "\\" in name or name != name.strip()):
        raise ConfigError(
            f"train.run_name={name!r} must be one folder name (no '/', no '..'): the run folder is "
            "train.output_dir/train.run_name; pass --train.output_dir to put runs elsewhere"
        )


def _validate_three_towers(cfg: TrainConfig) -> None:
    """Fields that only mean something under setting 3T, and what 3T does not support yet."""
    three_towers = cfg.model.parsed.three_towers
    weights = {
        "loss.weight_main": cfg.loss.weight_main,
        "loss.weight_image_third": cfg.loss.weight_image_third,
        "loss.weight_text_third": cfg.loss.weight_text_third,
    }
    if not three_towers:
        changed = [key for key, value in weights.items() if value != 1.0]
        if changed or cfg.eval.alphas:
            raise ConfigError(
                f"{', '.join(changed + (['eval.alphas'] if cfg.eval.alphas else []))} "
                f"apply to model.setting=3T only, not {cfg.model.setting!r}"
            )
        return
    if cfg.loss.kind != "softmax":
        raise ConfigError(
            f"loss.kind={cfg.loss.kind!r} is not supported with model.setting=3T yet; use loss.kind=softmax"
        )
    if not any(weights.values()):
        raise ConfigError(
            "loss.weight_main, loss.weight_image_third and loss.weight_text_third are "
            "all 0: the 3T loss would be identically 0"
        )
