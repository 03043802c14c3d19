"""The training loop: data, towers and objective wired to a DeepSpeed engine, with progress and eval.

Every rank runs the same code; only global rank 0 prints, writes metrics and logs to wandb.
Under ZeRO-3 every rank must take part in every forward (including evaluation), because each
forward all-gathers the partitioned parameters. The pieces live beside this file: the run's data
and folder (``run_setup.py``), its towers (``model_setup.py``), checkpoints (``checkpointer.py``),
evaluation (``run_eval.py``) and exact accumulation (``gradcache.py``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from tritower.data.atomic import write_json_atomic
from tritower.launch.checkpoint.checkpointer import (
    Checkpointer,
    gather_per_rank,
    locked_identities,
    rng_state,
    set_rng_state,
)
from tritower.launch.config import ConfigError, TrainConfig, run_name
from tritower.launch.config_file import write_config_file
from tritower.launch.engine.ds_config import micro_batches_per_step
from tritower.launch.engine.engine import build_engine, init_distributed
from tritower.launch.engine.gradcache import gradcache_backward, split_batch
from tritower.launch.lifecycle import dist_env
from tritower.launch.lifecycle.preemption import AlreadyFinished, Diverged, EvalFailed, Preempted, StopRequest
from tritower.launch.lifecycle.watchdog import HangWatchdog
from tritower.launch.loop.divergence import DivergenceGuard, chance_loss
from tritower.launch.loop.run_eval import RunEvaluator
from tritower.launch.loop.run_setup import (
    build_loaders,
    check_embeddings,
    check_inputs,
    prepare_run_folder,
    resolve_data,
)
from tritower.launch.metrics.monitors import write_monitor_events
from tritower.launch.metrics.progress import (
    agree_on_flags,
    data_quality,
    eval_line,
    eval_record,
    progress_line,
    step_record,
    wandb_values,
)
from tritower.launch.metrics.run_io import WandbLogger, write_curves
from tritower.launch.towers.model_setup import (
    TowerInputs,
    apply_unlock_schedule,
    build_towers,
    text_tokenizer_source,
    unlock_events,
)
from tritower.losses import NonFiniteInputError, build_objective
from tritower.model.precision import dtype_of


class Trainer:
    """Builds everything from one ``TrainConfig`` and runs ``train()``."""

    def __init__(self, cfg: TrainConfig) -> None:
        from tritower.data import build_text_tokenizer

        self.cfg, self.parsed = cfg, cfg.model.parsed
        self.stop = StopRequest()
        init_distributed()
        self.env = dist_env.from_environ()
        self.run_dir = Path(cfg.train.output_dir) / run_name(cfg)
        # Every check that needs no engine, before the towers are built: the folder is writable
        # and this run's alone, and what --resume names is complete and fits this run.
        folder = prepare_run_folder(cfg, self.run_dir, self.env)
        if folder.finished:
            self.log(f"tritower: {folder.finished}")
            raise AlreadyFinished()
        for warning in [*folder.warnings, *self.parsed.warnings]:  # parsed: image overrides unlike the weights' own
            self.log(f"tritower: warning: {warning}")
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config_file(cfg, self.run_dir)  # runs/<run>/config.yaml: --config it to re-run
        self.log(f"tritower: experiment {cfg.experiment}, world size {self.env.world_size}, run folder {self.run_dir}")

        sources = resolve_data(cfg.data, tokenizer_in_tower=self.parsed.text.is_pretrained)
        opened = check_inputs(cfg, sources)  # missing shards, eval sets, fp16 on a CPU: before the towers
        self.tokenizer = build_text_tokenizer(text_tokenizer_source(cfg, sources.vocab))

        # Same seed on every rank: the towers must start identical before ZeRO partitions them.
        torch.manual_seed(cfg.train.seed)
        self.towers = build_towers(cfg, vocab_size=cfg.model.vocab_size or len(self.tokenizer))
        self.log(f"setting {cfg.model.setting}: parameters per tower\n{self.towers.table}")
        self.embeddings_meta = None
        if self.towers.precomputed:
            self.embeddings_meta = meta = check_embeddings(cfg, self.towers.precomputed)
            self.log(
                f"{self.towers.precomputed} tower: precomputed embeddings {cfg.data.embeddings} ({meta.views} "
                f"view(s) per sample, width {meta.width}); the tower itself is not built"
            )
        self.engine, kernel_report = build_engine(self.towers.model, cfg, self.env.world_size, self.towers.groups)
        self.device, self.dtype = self.engine.device, dtype_of(cfg.deepspeed.precision)
        self.locked = self.towers.locked.to(self.device)
        self.inputs = TowerInputs(cfg, self.towers, self.engine.module, self.device, self.dtype)
        self.objective = build_objective(cfg.loss, three_towers=self.parsed.three_towers)
        self.log("kernels: " + "; ".join(kernel_report))

        self.per_rank_batch = cfg.data.batch_size // self.env.world_size
        self.micro_batches = micro_batches_per_step(cfg, self.env.world_size)
        if self.micro_batches > 1:
            self.log(
                f"exact accumulation (GradCache): {self.micro_batches} micro-batches of "
                f"{self.per_rank_batch // self.micro_batches} per rank, global batch {cfg.data.batch_size}"
            )
        self.train_loader, eval_sets = build_loaders(
            cfg, sources, self.tokenizer, self.env, self.per_rank_batch, self.inputs.needs_images(), opened
        )
        self.evaluator = None
        if eval_sets:
            model = (self.towers, self.locked, self.engine.module)
            self.evaluator = RunEvaluator(cfg, *model, eval_sets, self.tokenizer, self.device, self.dtype)
            for line in self.evaluator.describe():
                self.log(line)

        self.step = 0
        self.eval_failures: list[tuple[int, str]] = []  # (step, error) of evaluations that failed
        chance = chance_loss(cfg.loss.kind, self.parsed.three_towers, cfg.data.batch_size)
        self.guard = DivergenceGuard(cfg.train.max_nonfinite_in_row, chance, cfg.train.collapse_warn_steps)
        self.watchdog = HangWatchdog(
            self.run_dir / "heartbeats", self.env.rank, self.env.world_size, cfg.train.hang_timeout_s
        )
        self.checkpointer = Checkpointer.from_config(self.run_dir / "checkpoints", self.engine, cfg.checkpoint)
        wandb_id = self.restore(*folder.resume) if folder.resume is not None else None
        self.wandb = WandbLogger(cfg, self.run_dir, enabled=self.env.is_main, run_id=wandb_id)

    def log(self, line: str) -> None:
        if self.env.is_main:
            print(line, flush=True)

    def append_log(self, record: dict) -> None:
        """Rank 0 keeps a full-precision local log of training (``train_log.jsonl``) beside wandb's."""
        if self.env.is_main:
            with open(self.run_dir / "train_log.jsonl", "a") as out:
                out.write(json.dumps(record) + "\n")

    # -- checkpoints -------------------------------------------------------------------------
    def locked_identities(self) -> dict[str, dict[str, str]]:
        return locked_identities(self.locked, self.embeddings_meta, self.towers.precomputed, self.cfg.data.embeddings)

    def save(self, reason: str) -> None:
        """Checkpoint the engine and the trainer's state (a collective: all ranks call it). Never
        inside a non-finite streak: nothing good is there to keep, and the save could prune the
        last good checkpoint."""
        if self.guard.inside_streak:
            self.log(f"no checkpoint ({reason}) at step {self.step}: inside a run of non-finite losses")
            return
        per_rank = gather_per_rank({"data": self.train_loader.state_dict(), "rng": rng_state(self.device)})
        state = {"step": self.step, "samples_seen": self.step * self.cfg.data.batch_size, "config": self.cfg.to_dict()}
        state |= {"world_size": self.env.world_size, "nonfinite_total": self.guard.total}
        state |= {"collapsed_total": self.guard.collapsed_total}
        state |= {"data": [rank["data"] for rank in per_rank], "rng": [rank["rng"] for rank in per_rank]}
        state |= {"wandb_id": self.wandb.run_id, "locked": self.locked_identities()}
        with self.watchdog.paused():
            written = self.checkpointer.save(self.step, state, protect=self.guard.protected)
        self.guard.last_tag, self.last_save = written.name, (self.step, time.time())
        self.log(f"checkpoint written ({reason}): {written}")

    def restore(self, folder: Path, tag: str) -> str | None:
        """Load a checkpoint into the engine and the trainer; returns its wandb run id."""
        try:
            state = self.checkpointer.load(folder, tag, world_size=self.env.world_size, locked=self.locked_identities())
            self.checkpointer.restore_data_position(self.train_loader, state, folder / tag)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.step = int(state.get("step", 0))
        self.guard.total = int(state.get("nonfinite_total", 0))
        self.guard.collapsed_total = int(state.get("collapsed_total", 0))
        if "rng" in state:
            set_rng_state(state["rng"][self.env.rank], self.device)
        self.guard.last_tag = tag if folder == self.checkpointer.folder else None
        self.log(f"resumed from {folder / tag} at step {self.step}")
        return state.get("wandb_id")

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
            return result, out["logit_scale"].item()
        out = self.engine(**self.inputs(batch, self.step))
        result = self.objective_of(out)
        if torch.isfinite(result["loss"]):
            self.engine.backward(result["loss"])
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
        self.log(self.guard.nonfinite(self.step, loss))
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

    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        started = time.time()
        try:
            with self.watchdog.paused():
                metrics = self.evaluator()
        except ValueError as error:
            # Bad eval input (a label beyond the class names, ...) is found in the gathered features,
            # on every rank alike: every rank goes on training; the run ends with exit code 2.
            self.eval_failures.append((self.step, str(error)))
            self.log(
                f"tritower: warning: evaluation at step {self.step} failed ({error}): not scored; training goes on "
                "and its checkpoints are unaffected"
            )
            self.append_log({"step": self.step, "event": "eval_failed", "error": str(error)})
            return {}
        self.log(eval_line(self.step, metrics, time.time() - started))
        self.append_log(eval_record(self.step, metrics))
        self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, self.step)
        return metrics

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
        self.last_save = (self.step, started)
        window_steps, last_loss, scale, metrics = 0, math.nan, math.nan, {}
        batches = iter(self.train_loader)
        self.stop.immediate = False  # from here on a stop signal checkpoints first
        while self.step < steps:
            self.log_unlocks()
            judged = self.guard.last_tag  # this step's loss is the first made with that checkpoint's weights
            self.watchdog.phase = "data"
            batch_now = next(batches)
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
        final |= metrics
        if self.eval_failures:
            final |= {"eval_failed": len(self.eval_failures), "eval_error": self.eval_failures[-1][1]}
        if self.env.is_main:
            print(json.dumps(final), flush=True)
            write_json_atomic(self.run_dir / "metrics.json", final)
            write_curves(self.run_dir, cfg.log.curves)
        self.wandb.finish(final)
        if self.eval_failures:
            self.say_eval_failed()
            raise EvalFailed()
        return final

    def say_eval_failed(self) -> None:
        """The one line of a run whose training finished but whose evaluation failed (exit code 2)."""
        steps = ", ".join(str(step) for step, _ in self.eval_failures)
        saved = f"{self.run_dir / 'checkpoints'}, {self.run_dir / 'metrics.json'} (training values only)"
        if self.env.is_main:
            print(
                f"tritower: error: evaluation failed at step(s) {steps} ({self.eval_failures[-1][1]}); the training "
                f"itself finished and is saved ({saved}): fix the eval set, then evaluate the checkpoint with "
                "launch/tools/evaluate.py. Exit code 2.",
                file=sys.stderr,
                flush=True,
            )


def run(cfg: TrainConfig) -> dict:
    """Train one config to the end; the entry point ``launch/train.py`` calls."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Trainer(cfg).train()
