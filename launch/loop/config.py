"""The ``train`` section: length of the run, seeding, accumulation and progress output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
    evaluation or a checkpoint write) stops every rank with exit code 75 and one line naming it
    (launch/lifecycle/watchdog.py); 0 = off. Counted from the end of the first step (which may
    compile kernels)."""
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
    threads_per_rank: int = 0
    """Torch compute threads of each rank; 0 = ``OMP_NUM_THREADS`` if set, else the cores this
    process may use (``os.sched_getaffinity``) divided by the ranks on the node
    (``launch/engine/threads.py``; the start-up line says which)."""
    log_every: int = 10
    """Print a progress line (and log to wandb) every N steps."""
    log_sample_keys: bool = False
    """Append every step's global batch as sample keys (all ranks, rank order) to ``train_log.jsonl``
    (``{"step": s, "keys": [...]}``): which samples a step saw, to check a resume against a reference."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    run_name: str = ""
    """Run folder name under ``output_dir`` ("" = experiment name)."""
    compile: Literal["", "inductor", "aot_eager", "eager"] = ""
    """``torch.compile`` the towers in the engine (``nn.Module.compile``: parameter names and
    checkpoints unchanged) with this backend: ``inductor`` (kernels; minutes of compilation on a
    CPU), ``aot_eager`` or ``eager`` (graph capture only, for checking); "" = off."""
