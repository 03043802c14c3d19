"""What a run writes besides checkpoints: the metrics file and the wandb run (rank 0 only)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tritower.launch.config import TrainConfig


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2))


class WandbLogger:
    """wandb on global rank 0; a no-op elsewhere or with ``--wandb.mode=disabled``."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, enabled: bool, run_id: str | None = None) -> None:
        """``run_id`` comes from the checkpoint on resume, so the resumed run continues the same
        wandb run (``resume="allow"``); a sweep agent's ``WANDB_RUN_ID`` wins when set."""
        self.run = None
        if not enabled or cfg.wandb.mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity or None,
            name=run_dir.name,
            dir=str(run_dir),
            mode=cfg.wandb.mode,
            config=cfg.to_dict(),
            reinit="finish_previous",
            id=os.environ.get("WANDB_RUN_ID") or run_id,
            resume="allow",
        )

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, values: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def finish(self, summary: dict) -> None:
        if self.run is not None:
            for key, value in summary.items():
                self.run.summary[key] = value
            self.run.finish()
