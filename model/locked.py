"""Locked towers held outside the trainable model.

A fully locked tower (L without partial unlocking, and the 3T third tower) is not a trainable
parameter anywhere: the trainer keeps it as a plain module next to the DeepSpeed engine (eval
mode, ``requires_grad`` False, run under ``torch.inference_mode()``), never inside the engine,
where ZeRO-3 would still partition and all-gather it every step and ``zero_to_fp32`` of ZeRO-1
would silently drop it (DeepSpeed 0.19.8; see docs/export.md). On resume it is reloaded from its own source, and the
checkpoint records its identity (``LockedTower.identity()``) so a changed file is noticed.

Flow in the trainer::

    model = build_clip(cfg.model, vocab_size)
    trainable = resolve_trainable(model, trainable_rules(cfg.model))
    model, locked = split_locked(model, cfg.model)       # locked.image / .text / .third
    apply_trainable(model, trainable)                     # names of what is left are unchanged
    engine = deepspeed.initialize(model, parameter_groups(model, trainable, ...))
    emb = locked.image.encode(images)                     # [B,width], no autograd graph
    out = engine(image_embeddings=emb, input_ids=ids, attention_mask=mask)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .pretrained import file_sha256, load_image_tower

if TYPE_CHECKING:
    from .clip import CLIPModel
    from .config import ModelConfig


class LockedTower(nn.Module):
    """A frozen tower: ``encode(*inputs) -> features`` without autograd, always in eval mode.

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward under autocast on the
    inputs' device type, halving the memory traffic of a large locked tower.
    """

    def __init__(
        self,
        tower: nn.Module,
        name: str,
        source: str = "",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tower = tower.eval().requires_grad_(False)
        self.name = name
        self.source = source or getattr(tower, "source", "")
        self.autocast_dtype = autocast_dtype
        self._sha256 = ""

    @property
    def width(self) -> int:
        """Feature size of ``encode``'s output."""
        return self.tower.width

    def train(self, mode: bool = True) -> LockedTower:
        """Stays in eval mode whatever is asked: dropout and BatchNorm statistics are part of
        what is locked."""
        return super().train(False)

    def encode(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The tower's features for ``inputs`` (images, or input_ids and attention_mask)."""
        device_type = inputs[0].device.type
        autocast = (
            torch.autocast(device_type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            features = self.tower(*inputs)
        # An inference tensor cannot be saved for backward, and the trainable head that
        # consumes it saves its input; a clone made outside inference mode is a normal tensor.
        return features.clone()

    forward = encode

    def identity(self) -> dict[str, str]:
        """{"tower", "source", "sha256"}: what to store in a checkpoint and compare on resume."""
        if self.source and not self._sha256:
            self._sha256 = file_sha256(self.source)
        return {"tower": self.name, "source": self.source, "sha256": self._sha256}


@dataclass
class LockedTowers:
    """The towers ``split_locked`` took out of the model (None where a tower stays inside)."""

    image: LockedTower | None = None
    text: LockedTower | None = None
    third: LockedTower | None = None

    def modules(self) -> dict[str, LockedTower]:
        """{"image_tower" | "text_tower" | "third_tower": tower} of those present (for
        ``parameter_table(..., locked=...)``)."""
        return {f"{k}_tower": v for k, v in vars(self).items() if v is not None}

    def identities(self) -> dict[str, dict[str, str]]:
        """Identity of each locked tower, for the checkpoint's client state."""
        return {k: v.identity() for k, v in self.modules().items()}

    def to(self, device: torch.device | str) -> LockedTowers:
        """Moves every locked tower to ``device``."""
        for tower in self.modules().values():
            tower.to(device)
        return self


def build_third_tower(cfg: ModelConfig, autocast_dtype: torch.dtype | None = None) -> LockedTower:
    """The frozen pretrained third tower h of 3T, loaded from ``cfg.third.pretrained``."""
    name = cfg.third.tower or cfg.image.tower
    with torch.random.fork_rng(devices=[]):  # loading draws no numbers from the main stream
        tower = load_image_tower(name, cfg.third.pretrained)
    return LockedTower(tower, name, autocast_dtype=autocast_dtype)


def split_locked(
    model: CLIPModel,
    cfg: ModelConfig,
    autocast_dtype: torch.dtype | None = None,
    build_third: bool = True,
) -> tuple[CLIPModel, LockedTowers]:
    """Takes every fully locked tower out of ``model`` (the attribute becomes None) and returns
    it as a LockedTower; under 3T also builds the third tower (unless ``build_third`` is False:
    its output comes precomputed). A tower ``build_clip`` left out stays None.

    A partially unlocked L tower (``*_unlock_last_blocks`` > 0) stays inside, its locked blocks
    with ``requires_grad`` False. Names of the remaining parameters do not change, so the
    resolved ``{name: trainable}`` map still applies.
    """
    locked = LockedTowers()
    for tower in cfg.parsed.main_towers:
        if tower.fully_locked:
            module = getattr(model, f"{tower.role}_tower")
            if module is None:
                continue
            setattr(locked, tower.role, LockedTower(module, tower.name, autocast_dtype=autocast_dtype))
            setattr(model, f"{tower.role}_tower", None)
    if cfg.parsed.three_towers and build_third:
        locked.third = build_third_tower(cfg, autocast_dtype)
    return model, locked


class CLIPWithLocked(nn.Module):
    """Evaluation view: the trainable model plus its locked towers behind the usual
    ``encode_image(images)`` / ``encode_text(input_ids, attention_mask)`` (what
    ``tritower.evaluation`` calls). Not for training: the trainer calls the engine itself."""

    def __init__(self, model: nn.Module, locked: LockedTowers) -> None:
        super().__init__()
        self.model = model
        self.locked = locked

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images [B,3,H,W] -> [B,embed_dim]."""
        if self.locked.image is None:
            return self.model.encode_image(images, normalize=normalize)
        embeddings = self.locked.image.encode(images).to(self.model.image_proj.weight.dtype)
        return self.model.encode_image(normalize=normalize, image_embeddings=embeddings)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """input_ids, attention_mask [B,L] -> [B,embed_dim]."""
        if self.locked.text is None:
            return self.model.encode_text(input_ids, attention_mask, normalize=normalize)
        embeddings = self.locked.text.encode(input_ids, attention_mask)
        embeddings = embeddings.to(self.model.text_proj.weight.dtype)
        return self.model.encode_text(normalize=normalize, text_embeddings=embeddings)
