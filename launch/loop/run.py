"""A run: everything training one config is made of, built in order (run folder, data, towers,
engine, loaders, evaluation, checkpointer, wandb), and what it writes besides the steps: its logs,
its checkpoints (the client state is the checkpointer's, ``launch/checkpoint/``) and its
evaluations. ``trainer.py`` runs the loop over it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from tritower.launch.checkpoint.checkpointer import Checkpointer, locked_identities, trainer_state
from tritower.launch.config import ConfigError, TrainConfig, run_name
from tritower.launch.config_file import write_config_file
from tritower.launch.engine.ds_config import micro_batches_per_step
from tritower.launch.engine.engine import build_engine, init_distributed
from tritower.launch.lifecycle import dist_env
from tritower.launch.lifecycle.preemption import AlreadyFinished, StopRequest
from tritower.launch.lifecycle.watchdog import HangWatchdog
from tritower.launch.loop.divergence import DivergenceGuard, chance_loss
from tritower.launch.loop.run_eval import RunEvaluator
from tritower.launch.loop.run_setup import (
    build_loaders,
    check_embeddings,
    check_inputs,
    data_ranks_of,
    prepare_run_folder,
    resolve_data,
)
from tritower.launch.metrics.progress import eval_line, eval_record
from tritower.launch.metrics.wandb_logger import WandbLogger
from tritower.launch.towers.model_setup import TowerInputs, build_towers, text_tokenizer_source
from tritower.losses import build_objective
from tritower.model.precision import dtype_of


class Run:
    """Builds everything from one ``TrainConfig``; a collective on every rank."""

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
        self.data_ranks = data_ranks_of(cfg, folder, self.env.world_size)
        self.train_loader, eval_sets = build_loaders(
            cfg, sources, self.tokenizer, self.env, self.per_rank_batch, self.inputs.needs_images(), opened,
            data_ranks=self.data_ranks,
        )  # fmt: skip
        self.evaluator = None
        if eval_sets:
            model = (self.towers, self.locked, self.engine.module)
            self.evaluator = RunEvaluator(cfg, *model, eval_sets, self.tokenizer, self.device, self.dtype)
            for line in self.evaluator.describe():
                self.log(line)

        self.step = 0
        self.wall_before: float | None = 0.0
        """Training seconds of the starts before this one (None: a checkpoint from before it was kept)."""
        self.train_started: float | None = None
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

    # -- checkpoints ----------------------------------------------------------------------------
    def locked_identities(self) -> dict[str, dict[str, str]]:
        return locked_identities(self.locked, self.embeddings_meta, self.towers.precomputed, self.cfg.data.embeddings)

    def save(self, reason: str) -> None:
        """Checkpoint the engine and the trainer's state (a collective: all ranks call it). Never
        inside a non-finite streak: nothing good is there to keep, and the save could prune the
        last good checkpoint."""
        if self.guard.inside_streak:
            self.log(f"no checkpoint ({reason}) at step {self.step}: inside a run of non-finite losses")
            return
        counters = {"nonfinite_total": self.guard.total, "collapsed_total": self.guard.collapsed_total}
        counters["train_wall_s"] = self.run_wall_s()
        state = trainer_state(
            self.step, self.cfg.to_dict(), self.env.world_size, counters, self.train_loader, self.device,
            wandb_id=self.wandb.run_id, locked=self.locked_identities(),
        )  # fmt: skip
        with self.watchdog.paused():
            written = self.checkpointer.save(self.step, state, protect=self.guard.protected)
        self.guard.last_tag, self.last_save = written.name, (self.step, time.time())
        self.log(f"checkpoint written ({reason}): {written}")

    def run_wall_s(self) -> float | None:
        """Training seconds of the whole run so far, over every start (None if an older checkpoint
        did not keep them)."""
        if self.wall_before is None:
            return None
        return self.wall_before + (time.time() - self.train_started if self.train_started else 0.0)

    def restore(self, folder: Path, tag: str) -> str | None:
        """Load a checkpoint into the engine and the trainer; returns its wandb run id."""
        try:
            state = self.checkpointer.resume(
                folder, tag, self.train_loader, self.device, self.env, locked=self.locked_identities()
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.step = int(state.get("step", 0))
        self.wall_before = state.get("train_wall_s")
        self.guard.total = int(state.get("nonfinite_total", 0))
        self.guard.collapsed_total = int(state.get("collapsed_total", 0))
        self.guard.last_tag = tag if folder == self.checkpointer.folder else None
        self.log(f"resumed from {folder / tag} at step {self.step}")
        saved_world = int(state.get("world_size") or self.env.world_size)
        if saved_world != self.env.world_size:
            self.log(
                f"elastic resume from {saved_world} to {self.env.world_size} ranks: model weights, fp32 master weights "
                "and optimizer moments resharded (DeepSpeed universal checkpoint), learning-rate schedule at step "
                f"{self.step}, data position of {self.data_ranks} data ranks ({self.data_ranks // self.env.world_size} "
                "per rank) continued exactly; per-rank RNG streams (dropout) are not continued exactly"
            )
        return state.get("wandb_id")

    # -- evaluation ---------------------------------------------------------------------------
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
