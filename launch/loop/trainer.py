"""The training loop: data, towers and objective wired to a DeepSpeed engine, with progress and eval.

Every rank runs the same code; only global rank 0 prints, writes metrics and logs to wandb.
Under ZeRO-3 every rank must take part in every forward (including evaluation), because each
forward all-gathers the partitioned parameters. What the loop runs over is built in ``run.py``
(the run folder and data in ``run_setup.py``, evaluation in ``run_eval.py``); the towers, the
engine, checkpoints and metrics are components of their own (``launch/towers/``,
``launch/engine/``, ``launch/checkpoint/``, ``launch/metrics/``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from tritower.data.atomic import strict_json, write_json_atomic
from tritower.evaluation.runner import counts_as_int
from tritower.launch.checkpoint.checkpointer import gather_per_rank
from tritower.launch.config import TrainConfig
from tritower.launch.engine.gradcache import gradcache_backward, split_batch
from tritower.launch.lifecycle.preemption import Diverged, EvalFailed, Preempted
from tritower.launch.loop.run import Run
from tritower.launch.metrics.monitors import write_monitor_events
from tritower.launch.metrics.progress import (
    agree_on_flags,
    data_quality,
    progress_line,
    step_record,
    wandb_values,
    write_curves,
)
from tritower.launch.towers.model_setup import apply_unlock_schedule, unlock_events
from tritower.losses import NonFiniteInputError

INPUT_NAMES = ("image_embeddings", "text_embeddings", "third_embeddings")
"""The engine's inputs made outside it: locked towers' outputs, precomputed embeddings."""


def nonfinite_inputs(inputs: list[dict[str, torch.Tensor]], device: torch.device) -> tuple[str, ...]:
    """Which of ``INPUT_NAMES`` held NaN/Inf on any rank (one all-reduce on ``device``, which NCCL
    needs to be the GPU: every rank calls it)."""
    import torch.distributed as dist

    flags = torch.tensor(
        [float(any(name in i and not torch.isfinite(i[name]).all() for i in inputs)) for name in INPUT_NAMES],
        device=device,
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return tuple(name for name, flag in zip(INPUT_NAMES, flags.tolist(), strict=True) if flag)


class Trainer(Run):
    """The loop over a ``Run``: ``train()`` steps it to ``train.steps``."""

    bad_inputs: tuple[str, ...] = ()
    """The last step's non-finite inputs (``nonfinite_inputs``), for the divergence stop."""

    # -- one step ----------------------------------------------------------------------------
    def objective_of(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The objective on the engine's outputs: ``{"loss": ..., <named terms>}``; NaN where the
        features were not finite."""
        # The loss runs in fp32 whatever the towers' precision: logits of unit vectors times ~100
        # lose too much in bf16.
        out = {key: value.float() for key, value in out.items()}
        try:
            return self.objective(out)
        except NonFiniteInputError as error:
            # Every rank raises together; the step is skipped and counted like a NaN loss.
            self.log(f"non-finite features: {error}")
            return {"loss": torch.tensor(float("nan"))}

    def forward_backward(self, batch: dict) -> tuple[dict[str, torch.Tensor], float]:
        """Gradients of one global batch, whole or by GradCache micro-batches; no update yet.
        Returns the objective's result (detached) and the logit scale."""
        if self.micro_batches > 1:
            micro_inputs = [self.inputs(micro, self.step) for micro in split_batch(batch, self.micro_batches)]
            result, out = gradcache_backward(self.engine, micro_inputs, self.objective_of, self.device)
            self.bad_inputs = () if torch.isfinite(result["loss"]) else nonfinite_inputs(micro_inputs, self.device)
            return result, out["logit_scale"].item()
        inputs = self.inputs(batch, self.step)
        out = self.engine(**inputs)
        result = self.objective_of(out)
        if torch.isfinite(result["loss"]):
            self.engine.backward(result["loss"])
            self.bad_inputs = ()
        else:  # the loss is global: every rank is here, so the collective below is met
            self.bad_inputs = nonfinite_inputs([inputs], self.device)
        return {key: value.detach() for key, value in result.items()}, out["logit_scale"].item()

    def train_step(self, batch: dict) -> tuple[dict[str, float], float]:
        """One optimizer step; returns ({"loss": global loss, terms...}, logit scale). A non-finite
        loss updates nothing."""
        result, scale = self.forward_backward(batch)
        if torch.isfinite(result["loss"]):
            apply_unlock_schedule(self.engine.optimizer, self.cfg, self.step)
            self.engine.step()
        else:
            # The loss value is the global one, identical on every rank, so all ranks skip together.
            # The schedule still advances: step numbers and learning rates stay aligned.
            self.engine.lr_scheduler.step()
        return {key: float(value) for key, value in result.items()}, scale

    def log_unlocks(self) -> None:
        """Announce a delayed unlock at the step it happens (the step about to run is ``self.step``)."""
        for line, record in unlock_events(self.cfg, self.step):
            self.log(line)
            self.append_log(record)

    def count_nonfinite(self, loss: float) -> None:
        """Count a skipped step; too many in a row stop the run (exit code 3), naming the newest
        checkpoint whose weights gave a finite loss and how to resume from it (``divergence.py``)."""
        self.log(self.guard.nonfinite(self.step, loss, self.bad_inputs))
        if self.guard.must_stop:
            self.diverge()

    def diverge(self, ended: bool = False) -> None:
        """Stop as diverged (exit code 3): too many non-finite losses in a row, or (``ended``) the
        last step inside a shorter streak: no checkpoint, no final evaluation, no metrics.json."""
        self.watchdog.close()
        record, message = self.guard.stop(self.step, self.checkpointer, self.env.is_main, self.cfg.optim.lr, ended)
        self.append_log(record)
        if self.env.is_main:
            print(message, file=sys.stderr, flush=True)
        self.wandb.finish({"diverged_at_step": self.step})
        raise Diverged()

    def agreed_flags(self) -> tuple[bool, bool]:
        """(stop requested on any rank, time-based save due by rank 0's clock), same on all ranks.
        A stop is a signal or a launcher that went away (``StopRequest.poll``)."""
        minutes = self.cfg.checkpoint.every_minutes
        due = self.env.is_main and minutes > 0 and time.time() - self.last_save[1] >= 60 * minutes
        return agree_on_flags(self.stop.poll(), due)

    def log_progress(self, loss: float, last: float, terms: dict, scale: float, timing: tuple) -> None:
        """The progress line, the ``train_log.jsonl`` record and the wandb values of one logged step."""
        lr = self.engine.get_lr()[0]
        quality = data_quality(self.train_loader)
        steps = self.cfg.train.steps
        rate, took, eta = timing
        self.log(progress_line(self.step, steps, rate, last, lr, scale, took, eta, quality["bad"]))
        self.append_log(step_record(self.step, loss, lr, scale, rate, terms))
        values = wandb_values(last, lr, scale, rate, terms, self.guard.total, quality["bad"])
        self.wandb.log(values, self.step)
        write_monitor_events(self.engine, values, self.step)  # log.tensorboard / log.csv

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        steps, batch = cfg.train.steps, cfg.data.batch_size
        start_step = self.step
        started = window_start = time.time()
        self.train_started, samples_before = started, data_quality(self.train_loader)["good"]
        self.last_save = (self.step, started)
        window_steps, last_loss, scale, metrics = 0, math.nan, math.nan, {}
        batches = iter(self.train_loader)
        self.stop.immediate = False  # from here on a stop signal checkpoints first
        while self.step < steps:
            self.log_unlocks()
            judged = self.guard.last_tag  # this step's loss is the first made with that checkpoint's weights
            self.watchdog.phase = "data"
            batch_now = next(batches)
            if cfg.train.log_sample_keys:  # a collective: every rank's keys, in rank order
                keys = [key for part in gather_per_rank(batch_now["key"]) for key in part]
                self.append_log({"step": self.step + 1, "keys": keys})
            self.watchdog.phase = "step"
            result, scale = self.train_step(batch_now)
            loss, terms = result.pop("loss"), result
            self.step += 1
            window_steps += 1
            self.watchdog.beat(self.step)
            self.watchdog.start(self.step)  # once: from the end of the first step
            if math.isfinite(loss):
                last_loss = loss
                warning = self.guard.finite(judged, loss, scale, self.step)
                if warning:
                    self.log(warning)
            else:
                self.count_nonfinite(loss)
            if self.step % cfg.train.log_every == 0 or self.step == steps:
                now = time.time()
                rate = window_steps * batch / max(now - window_start, 1e-9)
                eta = (now - started) / (self.step - start_step) * (steps - self.step)
                self.log_progress(loss, last_loss, terms, scale, (rate, now - started, eta))
                window_start, window_steps = now, 0
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < steps:
                metrics = self.evaluate()
            stop, due = self.agreed_flags()
            every = cfg.checkpoint.every_steps
            if stop or due or (every and self.step % every == 0 and self.step < steps):
                self.save("preemption signal" if stop else "periodic")
            if stop:
                reason = self.stop.signal_name or "signal on another rank"
                self.log(
                    f"stopping for preemption ({reason}) at step {self.step}; exit code {Preempted().code} "
                    "asks the scheduler to requeue"
                )
                self.append_log(
                    {"step": self.step, "event": "stopped", "reason": reason, "exit_code": Preempted().code}
                )
                self.watchdog.close()
                self.wandb.finish({"preempted_at_step": self.step})
                raise Preempted(agreed=True)
        self.watchdog.close()
        wall = time.time() - started
        if self.guard.inside_streak or self.guard.ended_collapsed:  # the last weights are not good: not finished
            self.diverge(ended=True)
        # The last checkpoint comes before the last evaluation: an evaluation that fails cannot cost the run.
        if cfg.checkpoint.save_at_end and self.last_save[0] != self.step:
            self.save("end of training")
        if cfg.eval.at_end:
            metrics = self.evaluate()
        trained = self.step - start_step
        quality = data_quality(self.train_loader)
        final = {"experiment": cfg.experiment, "step": self.step, "loss": last_loss, "logit_scale": scale}
        final |= {"world_size": self.env.world_size, "global_batch": batch, "train_wall_s": round(wall, 2)}
        final |= {"samples_per_s": round(trained * batch / wall, 1) if trained else 0.0}
        final |= {"nonfinite_steps": self.guard.total, "collapsed_steps": self.guard.collapsed_total}
        final |= {"data_samples": quality["good"], "data_bad": quality["bad"]}
        # A resumed run: the values above are of this start (train_wall_s, samples_per_s) and of the
        # whole run (data_samples); both scopes, labelled.
        total_wall = None if self.wall_before is None else self.wall_before + wall
        final |= {"start_step": start_step, "this_start": {
            "steps": trained, "train_wall_s": round(wall, 2), "samples_per_s": final["samples_per_s"],
            "data_samples": quality["good"] - samples_before}}  # fmt: skip
        final |= {"run": {"steps": self.step, "train_wall_s": None if total_wall is None else round(total_wall, 2),
                          "data_samples": quality["good"]}}  # fmt: skip
        final |= counts_as_int(metrics)
        if self.eval_failures:
            final |= {"eval_failed": len(self.eval_failures), "eval_error": self.eval_failures[-1][1]}
        if self.env.is_main:
            print(json.dumps(strict_json(final)), flush=True)
            write_json_atomic(self.run_dir / "metrics.json", final)
            write_curves(self.run_dir, cfg.log.curves)
        self.wandb.finish(final)
        if self.eval_failures:
            self.say_eval_failed()
            raise EvalFailed()
        return final


def run(cfg: TrainConfig) -> dict:
    """Train one config to the end; the entry point ``launch/train.py`` calls."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Trainer(cfg).train()
