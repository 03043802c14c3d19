"""The run's wandb logger (global rank 0) and the login check made before any tower is built."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tritower.launch.config import TrainConfig


def check_wandb_login(mode: str) -> None:
    """``wandb.mode=online`` needs an API key (``WANDB_API_KEY``, or ``wandb login``'s netrc
    entry); without one wandb would stop the run after the towers were built, or wait for input.
    RuntimeError naming the fix."""
    if mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if netrc.netrc(path).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise RuntimeError(
        f"wandb.mode=online needs a W&B API key and none is set (no WANDB_API_KEY, no {host} entry in {path}): "
        "run `wandb login` or set WANDB_API_KEY, or pass --wandb.mode=offline (sync later with `wandb sync`)"
    )


class WandbLogger:
    """wandb on global rank 0; a no-op elsewhere or with ``--wandb.mode=disabled``.

    Logging is a convenience: once wandb fails (its service process died, from the same signal
    that preempts the run, or a lost connection), ``log`` and ``finish`` print one warning and the
    logger turns itself off, so no stop path (75, 3) or finished run (0) changes its exit code.
    wandb's own exit hook, which would fail the same way, is removed with it (``wandb.teardown``
    unregisters it first)."""

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
            self._safely("log", lambda: self.run.log(values, step=step))

    def finish(self, summary: dict) -> None:
        def finish() -> None:
            for key, value in summary.items():
                self.run.summary[key] = value
            self.run.finish()

        if self.run is not None:
            self._safely("finish", finish)
            self.run = None

    def _safely(self, what: str, action: object) -> None:
        try:
            action()
        except Exception as error:  # anything wandb raises: the run must not fail for its logger
            import wandb

            message = f"{type(error).__name__}: {error}".splitlines()[0]
            print(
                f"tritower: warning: wandb {what} failed ({message}); wandb logging is off for the rest of this "
                "process, the run itself is unaffected (train_log.jsonl has every value)",
                file=sys.stderr,
                flush=True,
            )
            self.run = None
            with contextlib.suppress(Exception):
                wandb.teardown()  # unregisters wandb's exit hook, which would raise the same error
