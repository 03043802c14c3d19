"""Divergence: non-finite losses counted, the last checkpoint proven good remembered, and the
stop that names it (exit code 3) with advice that works when followed (docs/training.md).

A checkpoint holds the weights after its step's update, so only the next step's loss shows
whether they are good: the newest tag whose next loss was finite is ``verified_tag``. None is
written inside a streak of non-finite losses, pruning spares ``verified_tag``, and a tag written
just before the streak (its weights gave the first non-finite loss) is marked suspect, so
``--resume auto`` skips it too.
"""

from __future__ import annotations

from pathlib import Path

from tritower.launch.checkpointer import Checkpointer


class DivergenceGuard:
    """The trainer's non-finite-loss bookkeeping (the same on every rank: losses are global)."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.total = self.in_row = 0
        self.last_tag: str | None = None  # the newest checkpoint written or resumed from
        self.verified_tag: str | None = None  # the newest whose weights then gave a finite loss

    @property
    def inside_streak(self) -> bool:
        return self.in_row > 0

    @property
    def protected(self) -> tuple[str, ...]:
        """Tags pruning must spare."""
        return (self.verified_tag,) if self.verified_tag else ()

    def finite(self, judged: str | None) -> None:
        """A finite loss, made with the weights of checkpoint ``judged`` (the newest before the step)."""
        self.in_row, self.verified_tag = 0, judged

    def nonfinite(self, step: int, loss: float) -> str:
        """Count a skipped step; returns the line to print."""
        self.total += 1
        self.in_row += 1
        return f"step {step}: non-finite loss ({loss}), step skipped ({self.in_row} in a row, {self.total} in total)"

    @property
    def must_stop(self) -> bool:
        return self.in_row >= self.max_in_row

    def stop(
        self, step: int, checkpointer: Checkpointer, is_main: bool, lr: float, ended: bool = False
    ) -> tuple[dict, str]:
        """Mark the suspect tag (rank 0) and return the ``train_log.jsonl`` record and the one-line
        message of the stop. ``ended``: the last step came inside a streak shorter than the limit;
        such a run did not finish either (its weights gave a non-finite loss last)."""
        first = step - self.in_row + 1
        good = checkpointer.folder / self.verified_tag if self.verified_tag else None
        if is_main and self.last_tag and self.last_tag != self.verified_tag:
            checkpointer.mark_suspect(self.last_tag, f"its weights gave the non-finite loss of step {first}", good)
        record = {"step": step, "event": "diverged", "good_checkpoint": str(good) if good else None}
        reason = f"{self.in_row} non-finite losses in a row (steps {first}-{step})"
        if ended:
            reason = f"the run ended inside a streak of {reason}, so its last weights are not good"
        return record, f"tritower: stopped: {reason}; {divergence_advice(good, lr)}. Exit code 3."


def divergence_advice(good: Path | None, lr: float) -> str:
    """What a run that diverged tells its user: the newest checkpoint whose weights still gave a
    finite loss and the command that resumes from it, or how to start again."""
    lower = f"--optim.lr={lr / 10:g}"
    if good is not None:
        return (
            f"the newest checkpoint whose weights still gave a finite loss is {good}. Resume from it with a "
            f"lower learning rate: --resume {good} {lower} (ten times lower; lower again if it diverges "
            "again; or raise --optim.warmup_steps, or use bf16/fp32 instead of fp16)"
        )
    return (
        "no checkpoint of this run was written before them: start again with a lower learning rate "
        f"({lower} and a new --train.run_name, or raise --optim.warmup_steps)"
    )
