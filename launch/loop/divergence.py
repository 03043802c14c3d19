"""Divergence: non-finite losses counted, the last checkpoint proven good remembered, and the
stop that names it (exit code 3) with advice that works when followed (docs/training.md).

A checkpoint holds the weights after its step's update, so only the next step's loss shows
whether they are good: the newest tag whose next loss was finite is ``verified_tag``. None is
written inside a streak of non-finite losses, pruning spares ``verified_tag``, and a tag written
just before the streak (its weights gave the first non-finite loss) is marked suspect, so
``--resume auto`` skips it too.

A finite loss is not enough for "good": a model that tells no pair apart gives every logit the
same value and a softmax loss of exactly ln(global batch), every step, without a NaN (features
collapsed to one point, a logit scale driven to 0, precomputed embeddings out of scale). The
health rule: a step is **collapsed** when its loss is within ``COLLAPSE_TOLERANCE`` of that chance
value (softmax CLIP/LiT losses; the value is known for them) or its logit scale is below
``MIN_LOGIT_SCALE`` (logits then span less than +-0.01: the loss cannot leave chance). Only a
healthy step (finite, not collapsed) proves the checkpoint before it good; collapsed steps are
counted, and ``collapse_warn_steps`` of them in a row print one warning. At random
initialisation the loss is ln(B) plus the spread of the logits (0.06 above ln 32 for clip_test,
about 0.2 for a 512-wide model at scale 14.3), well beyond the tolerance.
"""

from __future__ import annotations

import math
from pathlib import Path

from tritower.launch.checkpoint.checkpointer import Checkpointer
from tritower.launch.checkpoint.manifest import complete_tags

COLLAPSE_TOLERANCE = 1e-3
"""A loss closer than this to ln(global batch) is at chance (collapsed)."""
MIN_LOGIT_SCALE = 1e-2
"""A logit scale (exp of the learned log-temperature) below this is collapsed."""


def chance_loss(kind: str, three_towers: bool, global_batch: int) -> float | None:
    """The loss of a model whose logits are all equal: ln(B) for the softmax loss of CLIP/LiT;
    None where the rule does not apply (sigmoid, whose value depends on its bias; 3T's weighted sum)."""
    return math.log(global_batch) if kind == "softmax" and not three_towers else None


class DivergenceGuard:
    """The trainer's non-finite-loss bookkeeping (the same on every rank: losses are global)."""

    def __init__(self, max_in_row: int, chance: float | None = None, collapse_warn_steps: int = 20) -> None:
        """``chance``: the loss of a model that tells no pair apart (``chance_loss``), None if unknown."""
        self.max_in_row = max_in_row
        self.chance, self.collapse_warn_steps = chance, collapse_warn_steps
        self.collapsed_total = self.collapsed_in_row = 0
        self.total = self.in_row = 0
        self.bad_inputs: set[str] = set()
        """Inputs of the streak's steps that were themselves non-finite (``*_embeddings``: a locked
        tower's outputs or precomputed embeddings); empty when the loss went non-finite from finite inputs."""
        self.last_tag: str | None = None  # the newest checkpoint written or resumed from
        self.verified_tag: str | None = None  # the newest whose weights then gave a finite loss

    @property
    def inside_streak(self) -> bool:
        return self.in_row > 0

    @property
    def protected(self) -> tuple[str, ...]:
        """Tags pruning must spare."""
        return (self.verified_tag,) if self.verified_tag else ()

    def collapsed(self, loss: float, scale: float) -> bool:
        """The health rule (module docstring) for a finite loss and its logit scale."""
        if math.isfinite(scale) and scale < MIN_LOGIT_SCALE:
            return True
        return self.chance is not None and abs(loss - self.chance) <= COLLAPSE_TOLERANCE

    def finite(self, judged: str | None, loss: float, scale: float, step: int = 0) -> str | None:
        """A finite loss, made with the weights of checkpoint ``judged`` (the newest before the
        step). A healthy one proves ``judged`` good; a collapsed one is counted. Returns the
        warning line at the ``collapse_warn_steps``-th collapsed step in a row, else None."""
        self.in_row = 0
        self.bad_inputs.clear()
        if not self.collapsed(loss, scale):
            self.collapsed_in_row, self.verified_tag = 0, judged
            return None
        self.collapsed_total += 1
        self.collapsed_in_row += 1
        if self.collapsed_in_row != self.collapse_warn_steps:
            return None
        chance = f"ln(batch) = {self.chance:.4f}" if self.chance is not None else "chance"
        good = self.verified_tag or "none yet"
        return (
            f"tritower: warning: step {step}: the loss has stayed at {loss:.4f} ({chance}; logit scale {scale:.3g}) "
            f"for {self.collapsed_in_row} steps: the model tells no pair apart (collapsed features, a logit scale "
            "near 0, or precomputed embeddings out of scale). Checkpoints written now are not counted good; the "
            f"last good one is {good}"
        )

    def nonfinite(self, step: int, loss: float, bad_inputs: tuple[str, ...] = ()) -> str:
        """Count a skipped step (``bad_inputs``: which of its inputs were non-finite themselves);
        returns the line to print."""
        self.total += 1
        self.in_row += 1
        self.bad_inputs.update(bad_inputs)
        cause = f"; non-finite inputs: {', '.join(bad_inputs)}" if bad_inputs else ""
        return (
            f"step {step}: non-finite loss ({loss}), step skipped ({self.in_row} in a row, {self.total} in total)"
            + cause
        )

    @property
    def ended_collapsed(self) -> bool:
        """The last ``collapse_warn_steps`` steps or more were collapsed: a run ending so has not trained."""
        return self.collapsed_in_row >= self.collapse_warn_steps

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
            bad = f"the non-finite loss of step {first}" if self.in_row else "collapsed losses"
            checkpointer.mark_suspect(self.last_tag, f"its weights gave {bad}", good)
            for tag in complete_tags(checkpointer.folder):  # newer than the last good one: never proven good
                if tag != self.last_tag and (self.verified_tag is None or tag > self.verified_tag):
                    checkpointer.mark_suspect(tag, "written after the last good checkpoint (collapsed losses)", good)
        record = {"step": step, "event": "diverged", "good_checkpoint": str(good) if good else None}
        reason = f"{self.in_row} non-finite losses in a row (steps {first}-{step})"
        if ended and not self.in_row:
            first = step - self.collapsed_in_row + 1
            reason = (
                f"the run ended collapsed: {self.collapsed_in_row} steps in a row (steps {first}-{step}) at chance "
                "(loss at ln(batch) or logit scale near 0), so its last weights are not good"
            )
        elif ended:
            reason = f"the run ended inside a streak of {reason}, so its last weights are not good"
        advice = input_advice(self.bad_inputs) if self.bad_inputs else divergence_advice(good, lr)
        record["cause"] = "non-finite inputs" if self.bad_inputs else "non-finite loss from finite inputs"
        return record, f"tritower: stopped: {reason}; {advice}. Exit code 3."


def input_advice(bad_inputs: set[str]) -> str:
    """What a run whose inputs were non-finite tells its user: the inputs, where they come from, and
    that no learning rate fixes them."""
    names = ", ".join(sorted(bad_inputs))
    return (
        f"the steps' inputs were not finite ({names}: a locked tower's outputs or precomputed embeddings "
        "holding NaN/Inf), so a lower learning rate cannot help: check the locked tower's weights "
        "(--model.<tower>.pretrained) and, with --data.embeddings, write them again with launch/tools/precompute.py"
    )


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
