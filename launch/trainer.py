"""The training loop: data, towers and loss wired to a DeepSpeed engine, with progress and eval.

Every rank runs the same code; only global rank 0 prints, writes metrics and logs to wandb.
Under ZeRO-3 every rank must take part in every forward (including evaluation), because each
forward all-gathers the partitioned parameters.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tritower.data.config import DataConfig
from tritower.evaluation import evaluate
from tritower.launch import dist_env
from tritower.launch.config import TrainConfig
from tritower.launch.engine import (
    build_engine,
    init_distributed,
    load_checkpoint,
    save_checkpoint,
)
from tritower.launch.run_io import WandbLogger, format_duration, write_json_atomic
from tritower.losses import ContrastiveLoss
from tritower.model import build_clip, image_tower_spec, text_tower_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DataSources:
    """Resolved shard lists and vocabulary for a run."""

    train_shards: list[str]
    eval_shards: list[str]
    vocab: str


def resolve_data(cfg: DataConfig, rank: int) -> DataSources:
    """Built-in scenes (generated once, then reused) or the user's shards."""
    from tritower.data import ensure_builtin_data, expand_shards

    if cfg.train_shards in ("", "builtin"):
        builtin = ensure_builtin_data(cfg)
        return DataSources(builtin.train_shards, builtin.eval_shards, str(builtin.vocab_path))
    vocab = cfg.vocab
    if not vocab:
        raise ValueError("data.vocab must name a local vocab.txt (or a model folder holding one) for user shards")
    return DataSources(expand_shards(cfg.train_shards), expand_shards(cfg.eval_shards) if cfg.eval_shards else [], vocab)


class Trainer:
    """Builds everything from one ``TrainConfig`` and runs ``train()``."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        init_distributed()
        self.env = dist_env.from_environ()
        self.run_dir = Path(cfg.train.output_dir) / (cfg.train.run_name or cfg.experiment)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log(f"tritower: experiment {cfg.experiment}, world size {self.env.world_size}, run folder {self.run_dir}")

        from tritower.data import build_tokenizer, build_train_loader, load_eval_set

        sources = resolve_data(cfg.data, self.env.rank)
        self.tokenizer = build_tokenizer(sources.vocab)
        image_spec = image_tower_spec(cfg.model.image_tower)
        text_spec = text_tower_spec(cfg.model.text_tower)
        self.context_length = text_spec.context_length

        # Same seed on every rank: the towers must start identical before ZeRO partitions them.
        torch.manual_seed(cfg.train.seed)
        model = build_clip(cfg.model, vocab_size=cfg.model.vocab_size or len(self.tokenizer))
        self.engine, kernel_report = build_engine(model, cfg, self.env.world_size)
        self.device = self.engine.device
        self.dtype = DTYPES[cfg.deepspeed.precision]
        self.loss_fn = ContrastiveLoss.from_config(cfg.loss)
        self.log("kernels: " + "; ".join(kernel_report))

        self.per_rank_batch = cfg.data.batch_size // self.env.world_size
        self.start_step = 0
        if cfg.checkpoint.resume:
            client_state = load_checkpoint(self.engine, cfg.checkpoint.resume)
            self.start_step = int(client_state.get("step", 0))
            self.log(f"resumed from {cfg.checkpoint.resume} at step {self.start_step}")

        loader_args = dict(
            tokenizer=self.tokenizer, image_size=image_spec.image_size, mean=image_spec.mean,
            std=image_spec.std, context_length=self.context_length,
        )
        self.train_loader = build_train_loader(
            cfg.data, shards=sources.train_shards, rank=self.env.rank, world_size=self.env.world_size,
            per_rank_batch=self.per_rank_batch, seed=cfg.train.seed + self.start_step, **loader_args,
        )
        self.eval_set = load_eval_set(sources.eval_shards, **loader_args) if sources.eval_shards else None
        self.wandb = WandbLogger(cfg, self.run_dir, enabled=self.env.is_main)

    def log(self, line: str) -> None:
        if self.env.is_main:
            print(line, flush=True)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from tritower.data import tokenize

        return tokenize(self.tokenizer, captions, self.context_length)

    def evaluate(self, step: int) -> dict[str, float]:
        if self.eval_set is None:
            return {}
        started = time.time()
        metrics = evaluate(
            self.engine.module, self.eval_set, self.tokenize, device=self.device, dtype=self.dtype,
            batch_size=self.cfg.eval.batch_size, max_samples=self.cfg.eval.max_samples,
        )
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        self.log(f"eval @ step {step}: {shown} ({time.time() - started:.1f}s)")
        self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step)
        return metrics

    def train_step(self, batch: dict) -> tuple[float, float]:
        """One optimizer step; returns (global loss, logit scale)."""
        images = batch["image"].to(self.device, dtype=self.dtype, non_blocking=True)
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(self.device, non_blocking=True)
        out = self.engine(images, input_ids, attention_mask)
        # The loss runs in fp32 whatever the towers' precision: logits of unit vectors times ~100
        # lose too much in bf16.
        loss = self.loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at step {self.step}: lower --optim.lr, raise "
                "--optim.warmup_steps, or train in fp32/bf16 instead of fp16"
            )
        self.engine.backward(loss)
        self.engine.step()
        return loss.item(), out["logit_scale"].detach().float().item()

    def train(self) -> dict:
        cfg = self.cfg
        steps, batch = cfg.train.steps, cfg.data.batch_size
        started = window_start = time.time()
        window_steps = 0
        last_loss, scale = math.nan, math.nan
        metrics: dict = {}
        batches = iter(self.train_loader)
        self.step = self.start_step
        while self.step < steps:
            last_loss, scale = self.train_step(next(batches))
            self.step += 1
            window_steps += 1
            if self.step % cfg.train.log_every == 0 or self.step == steps:
                now = time.time()
                rate = window_steps * batch / max(now - window_start, 1e-9)
                lr = self.engine.get_lr()[0]
                elapsed = now - started
                eta = elapsed / (self.step - self.start_step) * (steps - self.step)
                self.log(
                    f"step {self.step}/{steps} | {rate:8.1f} samples/s | loss {last_loss:.4f} | lr {lr:.3e} | "
                    f"logit_scale {scale:.2f} | elapsed {format_duration(elapsed)} | eta {format_duration(eta)}"
                )
                self.wandb.log({"train/loss": last_loss, "train/lr": lr, "train/logit_scale": scale,
                                "train/samples_per_s": rate}, self.step)
                window_start, window_steps = now, 0
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < steps:
                metrics = self.evaluate(self.step)
        wall = time.time() - started
        if cfg.eval.at_end:
            metrics = self.evaluate(self.step)
        if cfg.checkpoint.save_at_end:
            tag = save_checkpoint(self.engine, self.run_dir / "checkpoints", self.step, cfg)
            self.log(f"checkpoint written: {self.run_dir / 'checkpoints' / tag}")
        trained = self.step - self.start_step
        final = {
            "experiment": cfg.experiment, "step": self.step, "loss": last_loss, "logit_scale": scale,
            "world_size": self.env.world_size, "global_batch": batch, "train_wall_s": round(wall, 2),
            "samples_per_s": round(trained * batch / wall, 1) if trained else 0.0, **metrics,
        }
        if self.env.is_main:
            print(json.dumps(final), flush=True)
            write_json_atomic(self.run_dir / "metrics.json", final)
        self.wandb.finish(final)
        return final


def run(cfg: TrainConfig) -> dict:
    """Train one config to the end; the entry point ``launch/train.py`` calls."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Trainer(cfg).train()
