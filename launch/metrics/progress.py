"""What a run reports while it trains: bad-data counts summed over ranks, the progress line, the
``train_log.jsonl`` records of a logged step and of an evaluation, the wandb values of a logged
step, and the curves figure at the end."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tritower.evaluation import COUNTS
from tritower.launch.checkpoint.checkpointer import gather_per_rank


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def write_curves(run_dir: Path, enabled: bool) -> None:
    """``log.curves``: draw the run's curves from its ``train_log.jsonl`` to ``<run>/curves.png``
    (global rank 0, at the end). A figure is a convenience: any failure to draw it is one warning
    line, never a failed run after the training and its checkpoint are done."""
    if not enabled:
        return
    try:
        from tritower.launch.metrics.curves import draw_curves

        print(f"curves: {draw_curves([run_dir], run_dir / 'curves.png')}", flush=True)
    except Exception as error:  # anything at all: the run itself has succeeded
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        print(f"warning: could not draw {run_dir / 'curves.png'} ({message}); the run is fine", file=sys.stderr)


def data_quality(loader: object) -> dict:
    """Good and bad samples so far, bad ones by kind, summed over ranks (a collective)."""
    stats = loader.stats()
    kinds = sorted(set().union(*gather_per_rank(list(stats.bad))))
    counts = torch.tensor([float(stats.good)] + [float(stats.bad.get(kind, 0)) for kind in kinds])
    dist.all_reduce(counts)
    return {"good": int(counts[0]), "bad": {kind: int(n) for kind, n in zip(kinds, counts[1:].tolist())}}


def progress_line(
    step: int,
    steps: int,
    rate: float,
    loss: float,
    lr: float,
    scale: float,
    elapsed: float,
    eta: float,
    bad: dict[str, int],
) -> str:
    """``step 10/450 | 98.1 samples/s | loss 4.1 | lr ... | logit_scale ... | elapsed ... | eta ...``."""
    total_bad = sum(bad.values())
    return (
        f"step {step}/{steps} | {rate:8.1f} samples/s | loss {loss:.4f} | lr {lr:.3e} | "
        f"logit_scale {scale:.2f} | elapsed {format_duration(elapsed)} | eta {format_duration(eta)}"
        + (f" | bad samples {total_bad} {bad}" if total_bad else "")
    )


def step_record(step: int, loss: float, lr: float, scale: float, rate: float, terms: dict[str, float]) -> dict:
    """One ``train_log.jsonl`` record: the step's loss at full precision (NaN where skipped)."""
    record = {"step": step, "loss": loss, "lr": lr, "logit_scale": scale, "samples_per_s": rate}
    return record | {f"loss_{k}": v for k, v in terms.items()}


def eval_record(step: int, metrics: dict[str, float]) -> dict:
    """The ``train_log.jsonl`` record of one evaluation (``launch/tools/report.py`` draws it); the
    metrics nested, so that no metric name can pass for a step record's field."""
    return {"step": step, "event": "eval", "metrics": metrics}


def wandb_values(
    last_loss: float,
    lr: float,
    scale: float,
    rate: float,
    terms: dict[str, float],
    nonfinite_total: int,
    bad: dict[str, int],
) -> dict:
    """The wandb values of a logged step (``train/``, ``data/``)."""
    values = {f"train/loss_{k}": v for k, v in terms.items()}
    values |= {"train/loss": last_loss, "train/lr": lr, "train/logit_scale": scale, "train/samples_per_s": rate}
    values |= {"train/nonfinite_total": nonfinite_total, "data/bad_samples": sum(bad.values())}
    return values | {f"data/bad_{k}": v for k, v in bad.items()}


def agree_on_flags(*flags: bool) -> tuple[bool, ...]:
    """Each flag set on any rank, the same on every rank (a collective: a max all-reduce)."""
    values = torch.tensor([float(flag) for flag in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(value) for value in values)


def eval_line(step: int, metrics: dict[str, float], seconds: float) -> str:
    """``eval @ step N: metric value, ...``: counts (eval_samples, eval_bad, zeroshot_unlabelled)
    as integers, metrics as fractions."""
    shown = ", ".join(f"{k} {v:.0f}" if k.rsplit("/", 1)[-1] in COUNTS else f"{k} {v:.3f}" for k, v in metrics.items())
    return f"eval @ step {step}: {shown} ({seconds:.1f}s)"
