"""The ``wandb`` and ``log`` sections: Weights & Biases, TensorBoard/CSV files and curves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class WandbConfig:
    """Weights & Biases logging (global rank 0 only)."""

    mode: Literal["online", "offline", "disabled"] = "offline"
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
