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
import torch.distributed as dist

from tritower.data.config import DataConfig
from tritower.evaluation import evaluate
from tritower.launch import checkpointing, dist_env
from tritower.launch.config import ConfigError, TrainConfig
from tritower.launch.ds_config import micro_batches_per_step
from tritower.launch.engine import build_engine, init_distributed
from tritower.launch.gradcache import gradcache_backward, split_batch
from tritower.launch.preemption import Preempted, StopRequest
from tritower.launch.run_io import WandbLogger, format_duration, write_json_atomic
from tritower.launch.towers import (
    TowerInputs,
    apply_unlock_schedule,
    build_eval_tower,
    build_towers,
    text_tokenizer_source,
    unlock_factors,
)
from tritower.losses import ContrastiveLoss, NonFiniteInputError
from tritower.model import CLIPWithLocked, image_tower_spec, parse_setting, text_tower_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DataSources:
    """Resolved shard lists and vocabulary for a run."""

    train_shards: list[str] | str
    eval_shards: list[str]
    vocab: str


def resolve_data(cfg: DataConfig) -> DataSources:
    """Built-in scenes (generated once, then reused) or the user's shards."""
    from tritower.data import ensure_builtin_data, expand_shards

    if cfg.train_shards in ("", "builtin"):
        builtin = ensure_builtin_data(cfg)
        return DataSources(builtin.train_shards, builtin.eval_shards, cfg.vocab or str(builtin.vocab_path))
    if not cfg.vocab:
        raise ConfigError("data.vocab must name a local vocab.txt (or a model folder holding one) when "
                          "data.train_shards are your own shards")
    # The spec string goes to the loader as is: weighted mixing ("a.tar::b.tar") needs it whole.
    return DataSources(cfg.train_shards, expand_shards(cfg.eval_shards) if cfg.eval_shards else [], cfg.vocab)


def run_name(cfg: TrainConfig) -> str:
    """The run folder's name: ``train.run_name``, else one per wandb sweep run, else the experiment.

    Under a sweep agent every run gets its own folder (named after ``WANDB_RUN_ID``, which the agent
    sets for each process), so runs never resume from each other's checkpoints.
    """
    if cfg.train.run_name:
        return cfg.train.run_name
    sweep_run = os.environ.get("WANDB_RUN_ID")
    return f"{cfg.experiment}-{sweep_run}" if sweep_run else cfg.experiment


class Trainer:
    """Builds everything from one ``TrainConfig`` and runs ``train()``."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.stop = StopRequest()
        init_distributed()
        self.env = dist_env.from_environ()
        self.run_dir = Path(cfg.train.output_dir) / run_name(cfg)
        self.checkpoints = self.run_dir / "checkpoints"
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log(f"tritower: experiment {cfg.experiment}, world size {self.env.world_size}, run folder {self.run_dir}")

        from tritower.data import build_train_loader, load_eval_set
        from tritower.model import build_text_tokenizer

        sources = resolve_data(cfg.data)
        self.tokenizer = build_text_tokenizer(text_tokenizer_source(cfg, sources.vocab))
        image_spec = image_tower_spec(cfg.model.image_tower)
        self.context_length = text_tower_spec(cfg.model.text_tower).context_length
        self.setting = parse_setting(cfg.model.setting)

        # Same seed on every rank: the towers must start identical before ZeRO partitions them.
        torch.manual_seed(cfg.train.seed)
        self.towers = build_towers(cfg, vocab_size=cfg.model.vocab_size or len(self.tokenizer))
        self.log(f"setting {cfg.model.setting}: parameters per tower\n{self.towers.table}")
        self.embeddings_meta = self.check_embeddings() if self.towers.precomputed else None
        self.engine, kernel_report = build_engine(self.towers.model, cfg, self.env.world_size, self.towers.groups)
        self.device = self.engine.device
        self.dtype = DTYPES[cfg.deepspeed.precision]
        self.locked = self.towers.locked.to(self.device)
        self.inputs = TowerInputs(cfg, self.towers, self.engine.module, self.device, self.dtype)
        self.loss_fn = ContrastiveLoss.from_config(cfg.loss)
        self.three_towers_loss = None
        if self.setting.three_towers:
            from tritower.losses import ThreeTowersLoss

            self.three_towers_loss = ThreeTowersLoss.from_config(cfg.loss)
        self.loss_terms: dict[str, float] = {}
        self.eval_towers: dict[str, object] = {}
        self.log("kernels: " + "; ".join(kernel_report))

        self.per_rank_batch = cfg.data.batch_size // self.env.world_size
        self.micro_batches = micro_batches_per_step(cfg, self.env.world_size)
        if self.micro_batches > 1:
            self.log(f"exact accumulation (GradCache): {self.micro_batches} micro-batches of "
                     f"{self.per_rank_batch // self.micro_batches} per rank, global batch {cfg.data.batch_size}")
        loader_args = dict(tokenizer=self.tokenizer, image_size=image_spec.image_size, mean=image_spec.mean,
                           std=image_spec.std, context_length=self.context_length)
        self.train_loader = build_train_loader(
            cfg.data, shards=sources.train_shards, rank=self.env.rank, world_size=self.env.world_size,
            per_rank_batch=self.per_rank_batch, seed=cfg.train.seed,
            needs_images=self.inputs.needs_images(), **loader_args,
        )
        self.eval_set = (load_eval_set(sources.eval_shards, caption_key=cfg.data.caption_key,
                                       label_key=cfg.data.label_key, **loader_args)
                         if sources.eval_shards else None)

        self.step = 0
        self.nonfinite_total = self.nonfinite_in_row = 0
        wandb_id = None
        target = checkpointing.resolve_resume(cfg.checkpoint.resume, self.checkpoints)
        if target is not None:
            wandb_id = self.restore(*target)
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
    def client_state(self) -> dict:
        """The trainer's state beside the engine's (a collective: all ranks call it)."""
        per_rank = checkpointing.gather_per_rank(
            {"data": self.train_loader.state_dict(), "rng": checkpointing.rng_state(self.device)}
        )
        return {
            "step": self.step, "samples_seen": self.step * self.cfg.data.batch_size,
            "config": self.cfg.to_dict(), "world_size": self.env.world_size,
            "data": [rank["data"] for rank in per_rank], "rng": [rank["rng"] for rank in per_rank],
            "nonfinite_total": self.nonfinite_total, "wandb_id": self.wandb.run_id,
            "locked": self.locked_identities(),
        }

    def locked_identities(self) -> dict[str, dict[str, str]]:
        """What each locked tower was loaded from (file and sha256), precomputed ones included."""
        identities = self.locked.identities()
        meta = self.embeddings_meta
        if meta is not None:
            name = "image_tower" if self.towers.precomputed == "image" else "third_tower"
            identities[name] = {"tower": meta.tower, "source": meta.source, "sha256": meta.sha256,
                                "embeddings": self.cfg.data.embeddings}
        return identities

    def check_embeddings(self):
        """The precomputed embeddings must come from the tower this config locks (name, file, width)."""
        from tritower.data.embeddings import load_meta
        from tritower.model import file_sha256

        model = self.cfg.model
        role = self.towers.precomputed
        name = model.image_tower if role == "image" else (model.third_tower or model.image_tower)
        source = model.image_pretrained if role == "image" else model.third_pretrained
        meta = load_meta(self.cfg.data.embeddings)
        spec = image_tower_spec(name)
        try:
            meta.check(tower=name, sha256=file_sha256(source), width=spec.width, image_size=spec.image_size,
                       mean=spec.mean, std=spec.std)
        except ValueError as error:
            raise ConfigError(f"data.embeddings={self.cfg.data.embeddings!r} do not fit the {role} tower "
                              f"{name} from {source!r}: {error}") from None
        self.log(f"{role} tower: precomputed embeddings {self.cfg.data.embeddings} ({meta.views} view(s) per "
                 f"sample, width {meta.width}); the tower itself is not built")
        return meta

    def save(self, reason: str) -> None:
        keep_every = self.cfg.checkpoint.keep_every_steps
        tag = checkpointing.save(
            self.engine, self.checkpoints, self.step, self.client_state(), keep_last=self.cfg.checkpoint.keep_last,
            keep=bool(keep_every and self.step % keep_every == 0),
        )
        self.last_save = (self.step, time.time())
        self.log(f"checkpoint written ({reason}): {self.checkpoints / tag}")

    def restore(self, folder: Path, tag: str) -> str | None:
        state = checkpointing.load(self.engine, folder, tag)
        saved_world = state.get("world_size", self.env.world_size)
        if saved_world != self.env.world_size:
            raise ConfigError(
                f"{folder / tag} was written by {saved_world} ranks, this run has {self.env.world_size}: "
                "resume with the same world size (the data position and RNG streams are per rank)"
            )
        recorded, current = state.get("locked", {}), self.locked_identities()
        for name, identity in recorded.items():
            now = current.get(name, {})
            if identity.get("sha256") and now.get("sha256") and identity["sha256"] != now["sha256"]:
                raise ConfigError(
                    f"{folder / tag} was trained with the locked {name} {identity.get('source')!r} "
                    f"(sha256 {identity['sha256'][:12]}...), this run loads {now.get('source')!r} (sha256 "
                    f"{now['sha256'][:12]}...): pass the original file to resume, or start a new run"
                )
        self.step = int(state.get("step", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        if "data" in state:
            self.train_loader.load_state_dict(state["data"])
        if "rng" in state:
            checkpointing.set_rng_state(state["rng"][self.env.rank], self.device)
        self.log(f"resumed from {folder / tag} at step {self.step}")
        return state.get("wandb_id")

    # -- one step ----------------------------------------------------------------------------
    def compute_loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The global-batch loss of the engine's outputs (3T: its three terms, kept in ``loss_terms``)."""
        # The loss runs in fp32 whatever the towers' precision: logits of unit vectors times ~100
        # lose too much in bf16.
        out = {key: value.float() for key, value in out.items()}
        try:
            if self.three_towers_loss is not None:
                loss, terms = self.three_towers_loss(out)
                self.loss_terms = {key: float(value) for key, value in terms.items()}
                return loss
            return self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
        except NonFiniteInputError as error:
            # Every rank raises together; the step is skipped and counted like a NaN loss.
            self.log(f"non-finite features: {error}")
            return torch.tensor(float("nan"))

    def forward_backward(self, batch: dict) -> tuple[torch.Tensor, float]:
        """Gradients of one global batch, whole or by GradCache micro-batches; no update yet."""
        if self.micro_batches > 1:
            micro_inputs = [self.inputs(micro, self.step) for micro in split_batch(batch, self.micro_batches)]
            loss, out = gradcache_backward(self.engine, micro_inputs, self.compute_loss, self.device)
            return loss, out["logit_scale"].item()
        out = self.engine(**self.inputs(batch, self.step))
        loss = self.compute_loss(out)
        if torch.isfinite(loss):
            self.engine.backward(loss)
        return loss.detach(), out["logit_scale"].item()

    def train_step(self, batch: dict) -> tuple[float, float]:
        """One optimizer step; returns (global loss, logit scale). A non-finite loss updates nothing."""
        loss, scale = self.forward_backward(batch)
        if torch.isfinite(loss):
            apply_unlock_schedule(self.engine.optimizer, self.cfg, self.step)
            self.engine.step()
        else:
            # The loss value is the global one, identical on every rank, so all ranks skip together.
            # The schedule still advances: step numbers and learning rates stay aligned.
            self.engine.lr_scheduler.step()
        return loss.item(), scale

    def log_unlocks(self) -> None:
        """Announce a delayed unlock at the step it happens (the step about to run is ``self.step``)."""
        for tower, factor in unlock_factors(self.cfg, self.step).items():
            if self.step == getattr(self.cfg.model, f"{tower}_unlock_after_steps"):
                warmup = self.cfg.optim.unlock_warmup_steps or self.cfg.optim.warmup_steps
                self.log(f"step {self.step}: {tower} tower unlocked (it was locked for steps 0-{self.step - 1}); "
                         f"its learning rate warms up over {warmup} steps")
                self.append_log({"step": self.step, "event": f"unlock_{tower}", "lr_factor": factor})

    def third_tower(self):
        """3T's frozen third tower h (built for evaluation when its embeddings came precomputed)."""
        if self.locked.third is not None:
            return self.locked.third
        if "third" not in self.eval_towers:
            self.eval_towers["third"] = build_eval_tower(self.cfg, "third").to(self.device)
        return self.eval_towers["third"]

    def eval_model(self) -> torch.nn.Module:
        """The engine's model with its locked towers (a precomputed tower is built for this only)."""
        locked = self.locked
        role = self.towers.precomputed
        if role == "image":
            if "image" not in self.eval_towers:
                self.eval_towers["image"] = build_eval_tower(self.cfg, "image").to(self.device)
            locked = type(locked)(image=self.eval_towers["image"], text=locked.text, third=locked.third)
        if locked.image is None and locked.text is None:
            return self.engine.module
        return CLIPWithLocked(self.engine.module, locked)

    def evaluate(self) -> dict[str, float]:
        if self.eval_set is None:
            return {}
        started = time.time()
        metrics = evaluate(
            self.eval_model(), self.eval_set, self.tokenize, device=self.device, dtype=self.dtype,
            batch_size=self.cfg.eval.batch_size, max_samples=self.cfg.eval.max_samples,
        )
        alphas = self.cfg.eval.alpha_values()
        if alphas and self.setting.three_towers:
            from tritower.evaluation import evaluate_alphas

            metrics.update(evaluate_alphas(
                self.engine.module, self.third_tower(), self.eval_set, self.tokenize, alphas, device=self.device,
                dtype=self.dtype, batch_size=self.cfg.eval.batch_size, max_samples=self.cfg.eval.max_samples,
            ))
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        self.log(f"eval @ step {self.step}: {shown} ({time.time() - started:.1f}s)")
        self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, self.step)
        return metrics

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from tritower.data import tokenize

        return tokenize(self.tokenizer, captions, self.context_length)

    def data_quality(self) -> dict:
        """Good and bad samples so far, bad ones by kind, summed over ranks (a collective)."""
        stats = self.train_loader.stats()
        kinds = sorted(set().union(*checkpointing.gather_per_rank(list(stats.bad))))
        counts = torch.tensor([float(stats.good)] + [float(stats.bad.get(kind, 0)) for kind in kinds])
        dist.all_reduce(counts)
        return {"good": int(counts[0]), "bad": {kind: int(n) for kind, n in zip(kinds, counts[1:].tolist())}}

    def agreed_flags(self) -> tuple[bool, bool]:
        """(stop requested on any rank, time-based save due by rank 0's clock), same on all ranks."""
        ckpt = self.cfg.checkpoint
        due = self.env.is_main and ckpt.every_minutes > 0 and time.time() - self.last_save[1] >= 60 * ckpt.every_minutes
        flags = torch.tensor([float(self.stop.requested), float(due)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        steps, batch = cfg.train.steps, cfg.data.batch_size
        start_step = self.step
        started = window_start = time.time()
        self.last_save = (self.step, started)
        window_steps = 0
        last_loss, scale = math.nan, math.nan
        metrics: dict = {}
        batches = iter(self.train_loader)
        while self.step < steps:
            self.log_unlocks()
            loss, scale = self.train_step(next(batches))
            self.step += 1
            window_steps += 1
            if math.isfinite(loss):
                last_loss, self.nonfinite_in_row = loss, 0
            else:
                self.nonfinite_total += 1
                self.nonfinite_in_row += 1
                self.log(f"step {self.step}: non-finite loss ({loss}), step skipped "
                         f"({self.nonfinite_in_row} in a row, {self.nonfinite_total} in total)")
                if self.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                    self.save("non-finite losses")
                    raise FloatingPointError(
                        f"{self.nonfinite_in_row} non-finite losses in a row at step {self.step}; a checkpoint "
                        f"is in {self.checkpoints}. Lower --optim.lr, raise --optim.warmup_steps, or use bf16/fp32 "
                        "instead of fp16, then --resume it"
                    )
            if self.step % cfg.train.log_every == 0 or self.step == steps:
                now = time.time()
                rate = window_steps * batch / max(now - window_start, 1e-9)
                lr = self.engine.get_lr()[0]
                eta = (now - started) / (self.step - start_step) * (steps - self.step)
                quality = self.data_quality()
                bad = sum(quality["bad"].values())
                self.log(
                    f"step {self.step}/{steps} | {rate:8.1f} samples/s | loss {last_loss:.4f} | lr {lr:.3e} | "
                    f"logit_scale {scale:.2f} | elapsed {format_duration(now - started)} | eta {format_duration(eta)}"
                    + (f" | bad samples {bad} {quality['bad']}" if bad else "")
                )
                self.append_log({"step": self.step, "loss": loss, "lr": lr, "logit_scale": scale, "samples_per_s": rate,
                                 **{f"loss_{k}": v for k, v in self.loss_terms.items()}})
                self.wandb.log({**{f"train/loss_{k}": v for k, v in self.loss_terms.items()}, "train/loss": last_loss, "train/lr": lr, "train/logit_scale": scale,
                                "train/samples_per_s": rate, "train/nonfinite_total": self.nonfinite_total,
                                "data/bad_samples": bad, **{f"data/bad_{k}": v for k, v in quality["bad"].items()}}, self.step)
                window_start, window_steps = now, 0
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < steps:
                metrics = self.evaluate()
            stop, due = self.agreed_flags()
            every = cfg.checkpoint.every_steps
            if stop or due or (every and self.step % every == 0 and self.step < steps):
                self.save("preemption signal" if stop else "periodic")
            if stop:
                self.log(f"stopping for preemption ({self.stop.signal_name or 'signal on another rank'}) "
                         f"at step {self.step}; exit code {Preempted().code} asks the scheduler to requeue")
                self.wandb.finish({"preempted_at_step": self.step})
                raise Preempted()
        wall = time.time() - started
        if cfg.eval.at_end:
            metrics = self.evaluate()
        if cfg.checkpoint.save_at_end and self.last_save[0] != self.step:
            self.save("end of training")
        trained = self.step - start_step
        quality = self.data_quality()
        final = {
            "experiment": cfg.experiment, "step": self.step, "loss": last_loss, "logit_scale": scale,
            "world_size": self.env.world_size, "global_batch": batch, "train_wall_s": round(wall, 2),
            "samples_per_s": round(trained * batch / wall, 1) if trained else 0.0,
            "nonfinite_steps": self.nonfinite_total, "data_samples": quality["good"], "data_bad": quality["bad"], **metrics,
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
