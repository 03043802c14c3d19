"""DeepSpeed's own monitors beside wandb: TensorBoard event files and CSV files in the run folder
(``log.tensorboard``, ``log.csv``; global rank 0 writes them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tritower.launch.config import TrainConfig, run_name
from tritower.launch.lifecycle import dist_env

if TYPE_CHECKING:
    import deepspeed


def add_monitors(ds_config: dict, cfg: TrainConfig) -> dict:
    """DeepSpeed's TensorBoard and CSV monitors (``log.tensorboard``, ``log.csv``) writing into the run
    folder; a policy file may also hold its own ``tensorboard``/``csv_monitor`` sections."""
    run_dir = str(Path(cfg.train.output_dir) / run_name(cfg))
    for enabled, key, folder in (
        (cfg.log.tensorboard, "tensorboard", "tensorboard"),
        (cfg.log.csv, "csv_monitor", "csv"),
    ):
        if enabled:
            ds_config[key] = {"enabled": True, "output_path": run_dir, "job_name": folder}
    return ds_config


def write_monitor_events(engine: deepspeed.DeepSpeedEngine, values: dict[str, float], step: int) -> None:
    """The trainer's logged values into DeepSpeed's monitors (TensorBoard, CSV), x-axis = step."""
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and monitor.enabled and dist_env.from_environ().is_main:
        monitor.write_events([(name, float(value), step) for name, value in values.items()])
