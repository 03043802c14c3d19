"""The trainer's side of tower settings: what enters the engine, what stays outside, what a step feeds it.

``model/`` decides *which* parameters train (regex rules over names, ``model/settings.py``) and
holds locked towers as plain modules (``model/locked.py``). This module applies that to a run:

* ``build_towers``: the CLIP model with every fully locked tower taken out (it never becomes a
  parameter of the DeepSpeed engine: no gradient, no optimizer state, no ZeRO partition), the
  optimizer parameter groups of what is left (per-tower learning-rate multipliers), and the
  start-of-run table of trainable and locked parameter counts. With precomputed embeddings
  (``data.embeddings``) the tower they replace is not even built.
* ``TowerInputs``: for each (micro-)batch, the keyword arguments of the engine's forward. A
  locked tower runs here, under ``torch.inference_mode()``, and only its output goes in; a
  pretrained tower whose delayed unlock has not come yet runs here too, without gradient.
* ``apply_unlock_schedule``: learning rate 0 for a tower before its delayed unlock, then a
  linear warm-up of its own (LiT's ablation), set before every optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tritower.launch.config import ConfigError, TrainConfig
from tritower.losses.config import SIGLIP_INIT_BIAS
from tritower.model import (
    CLIPModel,
    LockedTower,
    LockedTowers,
    apply_trainable,
    build_clip,
    load_image_tower,
    parameter_groups,
    parameter_table,
    resolve_trainable,
    split_locked,
    trainable_rules,
    trainable_towers_at,
)
from tritower.model.precision import autocast_dtype
from tritower.model.pretrained import PretrainedError


@dataclass
class Towers:
    """What ``build_towers`` made for a run."""

    model: CLIPModel
    """The trainable model (fully locked towers removed); goes into the engine."""
    locked: LockedTowers
    """Locked towers held beside the engine (None where absent or precomputed)."""
    groups: list[dict]
    """Optimizer parameter groups of the trainable parameters (explicit ``lr``, ``tower``)."""
    table: str
    """Printable table of trainable / locked parameter counts per tower."""
    precomputed: str = ""
    """``image`` or ``third``: the tower whose output comes precomputed in ``batch["embedding"]``."""


def precomputed_role(cfg: TrainConfig) -> str:
    """Which locked tower ``data.embeddings`` replaces: the L image tower, or 3T's third tower."""
    if not cfg.data.embeddings:
        return ""
    parsed = cfg.model.parsed
    if parsed.three_towers:
        return "third"
    if parsed.image.fully_locked:
        return "image"
    raise ConfigError(
        f"data.embeddings={cfg.data.embeddings!r} replaces a fully locked image tower, but setting "
        f"{cfg.model.setting!r} has none (use an L image tower without partial unlocking, e.g. Lu, or 3T); "
        "clear data.embeddings"
    )


def text_tokenizer_source(cfg: TrainConfig, builtin_vocab: str) -> str:
    """The tokenizer's files: ``data.vocab``, else a pretrained text tower's own, else the built-in one."""
    if cfg.data.vocab:
        return cfg.data.vocab
    if cfg.model.parsed.text.is_pretrained:
        return cfg.model.parsed.text.pretrained
    return builtin_vocab


def build_towers(cfg: TrainConfig, vocab_size: int) -> Towers:
    """The model for the engine, its locked towers and parameter groups (same on every rank)."""
    precomputed = precomputed_role(cfg)
    logit_bias = {"logit_bias": SIGLIP_INIT_BIAS} if cfg.loss.kind == "sigmoid" else {}
    model_cfg = cfg.model
    try:  # pretrained weights load here, before the engine: a file that does not fit is one line
        without = {"without": ("image",)} if precomputed == "image" else {}
        model = build_clip(model_cfg, vocab_size=vocab_size, **logit_bias, **without)
        trainable = resolve_trainable(model, trainable_rules(model_cfg))
        autocast = autocast_dtype(cfg.deepspeed.precision)
        model, locked = split_locked(model, model_cfg, autocast_dtype=autocast, build_third=precomputed != "third")
    except PretrainedError as error:
        raise ConfigError(f"pretrained weights: {error}") from None
    if model.image_tower is not None:
        parsed = model_cfg.parsed.image
        model.image_tower.set_regularisation(parsed.patch_dropout, parsed.drop_path)
    compile_towers(model, cfg.train.compile)
    apply_trainable(model, trainable)
    # Names of parameters still in the model are unchanged by split_locked.
    trainable = {name: trainable[name] for name, _ in model.named_parameters()}
    groups = parameter_groups(model, trainable, model_cfg, cfg.optim.weight_decay, cfg.optim.lr)
    if not groups:
        raise ConfigError(f"setting {model_cfg.setting!r} leaves nothing to train")
    table = parameter_table(model, trainable, locked.modules())
    if precomputed:
        table += f"\n({precomputed} tower: precomputed embeddings from {cfg.data.embeddings}, not built)"
    return Towers(model, locked, groups, table, precomputed)


def compile_towers(model: CLIPModel, backend: str) -> None:
    """``torch.compile`` each tower in the engine, in place (``nn.Module.compile`` keeps the
    parameter names, so trainable rules, ZeRO partitions and checkpoints are unchanged)."""
    if not backend:
        return
    for tower in (model.image_tower, model.text_tower):
        if tower is not None:
            tower.compile(backend=backend)


def build_eval_tower(cfg: TrainConfig, role: str) -> LockedTower:
    """The locked tower that precomputed embeddings stand for, for evaluation on new images only."""
    tower = cfg.model.parsed.tower(role)
    try:  # the image tower is built at model.image.image_size; the third tower at its own
        loaded = load_image_tower(tower.name, tower.pretrained, tower.image_size if role == "image" else 0)
    except PretrainedError as error:
        raise ConfigError(f"pretrained weights: {error}") from None
    return LockedTower(loaded, tower.name, autocast_dtype=autocast_dtype(cfg.deepspeed.precision))


class TowerInputs:
    """Turns a (micro-)batch into the engine forward's keyword arguments.

    A locked tower (or a U tower before its delayed unlock) is run here, outside autograd; the
    trainable towers run inside the engine. Under GradCache these arguments are built once per
    micro-batch and reused by both passes, so a locked tower is never run twice.
    """

    def __init__(
        self, cfg: TrainConfig, towers: Towers, module: nn.Module, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.cfg = cfg
        self.locked = towers.locked
        self.precomputed = towers.precomputed
        self.module = module  # the engine's module: its U towers run here while not yet unlocked
        self.device, self.dtype = device, dtype
        self.parsed = cfg.model.parsed

    def needs_images(self) -> bool:
        """Whether any tower reads pixels (False for Lu with precomputed image embeddings)."""
        return self.precomputed != "image" or self.parsed.three_towers

    def __call__(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        training = trainable_towers_at(self.cfg.model, step)
        images = batch.get("image")
        if images is not None:
            images = images.to(self.device, dtype=self.dtype, non_blocking=True)
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch["attention_mask"].to(self.device, non_blocking=True)
        kwargs: dict[str, torch.Tensor] = {}
        if self.precomputed == "image":
            kwargs["image_embeddings"] = self._embedding(batch)
        elif self.locked.image is not None:
            kwargs["image_embeddings"] = self.locked.image.encode(images).to(self.dtype)
        elif not training["image"] and self.parsed.image.letter == "U":
            kwargs["image_embeddings"] = self._frozen(self.module.image_tower, images)
        else:
            kwargs["images"] = images
        if self.locked.text is not None:
            kwargs["text_embeddings"] = self.locked.text.encode(ids, mask).to(self.dtype)
        elif not training["text"] and self.parsed.text.letter == "U":
            kwargs["text_embeddings"] = self._frozen(self.module.text_tower, ids, mask)
        else:
            kwargs["input_ids"], kwargs["attention_mask"] = ids, mask
        if self.parsed.three_towers:
            kwargs["third_embeddings"] = (
                self._embedding(batch)
                if self.precomputed == "third"
                else self.locked.third.encode(images).to(self.dtype)
            )
        return kwargs

    def _embedding(self, batch: dict) -> torch.Tensor:
        return batch["embedding"].to(self.device, dtype=self.dtype, non_blocking=True)

    def _frozen(self, tower: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        # A U tower before its delayed unlock: forward only (its parameters get no gradient and
        # lr 0). Under ZeRO-3 the module's own hooks gather its partitioned parameters.
        with torch.no_grad():
            return tower(*inputs).detach()


def unlock_factors(cfg: TrainConfig, step: int) -> dict[str, float]:
    """{"image"|"text": learning-rate factor} at optimizer ``step`` (0-based) for towers with a
    delayed unlock: 0 before ``*_unlock_after_steps``, then a linear ramp to 1 over
    ``optim.unlock_warmup_steps`` (0 = ``optim.warmup_steps``) steps."""
    warmup = cfg.optim.unlock_warmup_steps or cfg.optim.warmup_steps
    factors = {tower.role: tower.unlock_factor(step, warmup) for tower in cfg.model.parsed.main_towers}
    return {role: factor for role, factor in factors.items() if factor is not None}


def apply_unlock_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> None:
    """Scale the scheduler's learning rate of each delayed-unlock tower's groups (call right before
    the optimizer step; the scheduler recomputes every group's lr from scratch after it)."""
    factors = unlock_factors(cfg, step)
    if not factors:
        return
    for group in optimizer.param_groups:
        factor = factors.get(group.get("tower", ""))
        if factor is not None:
            group["lr"] *= factor


def unlock_events(cfg: TrainConfig, step: int) -> list[tuple[str, dict]]:
    """(progress line, ``train_log.jsonl`` record) for each tower whose delayed unlock happens at
    ``step`` (the step about to run)."""
    events = []
    for tower, factor in unlock_factors(cfg, step).items():
        if step == cfg.model.parsed.tower(tower).unlock_after_steps:
            warmup = cfg.optim.unlock_warmup_steps or cfg.optim.warmup_steps
            line = (
                f"step {step}: {tower} tower unlocked (it was locked for steps 0-{step - 1}); "
                f"its learning rate warms up over {warmup} steps"
            )
            events.append((line, {"step": step, "event": f"unlock_{tower}", "lr_factor": factor}))
    return events
