"""The training configuration: one typed dataclass per concern, and the checks across sections.

A run is an experiment name (a function in ``launch/experiments.py`` returning a ``TrainConfig``)
plus ``--section.field=value`` overrides (parsed by ``launch/cli.py``), the form wandb sweep agents
pass. ``validate`` runs every check before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

from tritower.data.config import DataConfig
from tritower.evaluation.config import EvalConfig
from tritower.launch.checkpoint.config import CheckpointConfig
from tritower.launch.engine.config import DeepSpeedConfig
from tritower.launch.loop.config import TrainLoopConfig
from tritower.launch.metrics.config import LogConfig, WandbConfig
from tritower.launch.optim.config import OptimConfig
from tritower.losses.config import LossConfig
from tritower.model.config import ModelConfig


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the problem and the fix."""


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
    for key, value, options in _closed_fields(cfg):  # a config built in Python, not parsed
        if value not in options:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, options))}")
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


def run_name(cfg: TrainConfig) -> str:
    """The run folder's name: ``train.run_name``, else one per wandb sweep run, else the experiment.

    Under a sweep agent every run gets its own folder (named after ``WANDB_RUN_ID``, which the agent
    sets for each process), so runs never resume from each other's checkpoints.
    """
    if cfg.train.run_name:
        return cfg.train.run_name
    sweep_run = os.environ.get("WANDB_RUN_ID")
    return f"{cfg.experiment}-{sweep_run}" if sweep_run else cfg.experiment


def _closed_fields(section: object, prefix: str = "") -> list[tuple[str, object, tuple]]:
    """(key, value, allowed values) of every ``Literal``-typed field under ``section``."""
    found = []
    for name, kind in typing.get_type_hints(type(section)).items():
        value = getattr(section, name)
        if dataclasses.is_dataclass(value):
            found += _closed_fields(value, f"{prefix}{name}.")
        elif typing.get_origin(kind) is Literal:
            found.append((f"{prefix}{name}", value, typing.get_args(kind)))
    return found


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
