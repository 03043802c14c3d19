"""Configuration of the model (the ``model`` section of the training config)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .registry import image_tower_spec, text_tower_spec

TEXT_POOLINGS = ("mean", "cls", "eot")


@dataclass
class ModelConfig:
    """Which towers make up the CLIP model and how their outputs meet in the shared space."""

    image_tower: str = "vit_scene_tiny"
    """Image tower name from ``tritower.model.registry`` (``vit_test``, ``vit_scene_tiny``,
    ``vit_base_patch16_224``, ``vit_large_patch14_224``, ``vit_giant_patch14_224``)."""
    text_tower: str = "bert_scene_tiny"
    """Text tower name from ``tritower.model.registry`` (``bert_test``, ``bert_scene_tiny``,
    ``bert_base``, ``bert_large``)."""
    embed_dim: int = 128
    """Size of the shared image-text embedding space (output of both linear projections)."""
    init_logit_scale: float = math.log(1 / 0.07)
    """Initial value of the learnable log-temperature; CLIP starts at ln(1/0.07)."""
    max_logit_scale: float = 100.0
    """Upper clamp of exp(logit_scale), as in CLIP, so the softmax cannot become one-hot."""
    init_logit_scale_3t: float = 0.0
    """3T only: initial log-temperature of the two third-tower terms (f_h-h_f and g_h-h_g);
    0 = the same as ``init_logit_scale``. (A true start at temperature 1 is ``1e-9``.)"""
    image_grad_checkpointing: bool = False
    """Recompute image-tower block activations in the backward pass (timm's own checkpointing)."""
    text_grad_checkpointing: bool = False
    """Recompute text-tower layer activations in the backward pass (transformers' checkpointing)."""
    text_pooling: str = ""
    """"" = the text family's own pooling (``mean`` for BERT and T5, ``eot`` for CLIP text).
    ``mean``: attention-masked mean over tokens; ``cls``: the first token's hidden state (BERT
    only); ``eot``: the last real token (CLIP's end-of-text token, seen whole under the causal
    mask). CLS pooling collapsed on the tiny default towers (loss stuck at ln(B)); mean trains."""
    vocab_size: int = 0
    """Rows of the token embedding table; 0 takes the tokenizer's size at build time. A positive
    value must be at least the tokenizer's size (a larger one pads the table, e.g. to a
    multiple of 64)."""
    setting: str = "uu"
    """LiT setting: image letter then text letter, each ``L`` (pretrained, locked), ``U``
    (pretrained, unlocked) or ``u`` (from scratch): LU, Lu, UU, Uu, uu, UL, uL, LL (the paper's
    eight) or uU; or ``3T`` (Three Towers: both main towers from scratch plus a frozen
    pretrained third image tower)."""
    image_pretrained: str = ""
    """Local checkpoint of the image tower (``.safetensors``/``.pth``/``.bin`` timm or open_clip
    visual state dict); required when the image letter is L or U, rejected for u."""
    text_pretrained: str = ""
    """Local transformers model folder of the text tower; required when the text letter is L or
    U unless the registry entry names a default (``minilm_l6``); rejected for u."""
    image_unlock_last_blocks: int = 0
    """Partial unlocking of a locked (L) image tower: its last N blocks (ResNet: stages) and the
    final norm train, everything before stays locked. 0 = fully locked."""
    text_unlock_last_blocks: int = 0
    """Partial unlocking of a locked (L) text tower: its last N layers (+ final norm) train."""
    image_lr_mult: float = 1.0
    """Learning-rate multiplier of the image tower's trainable parameters (not its head)."""
    text_lr_mult: float = 1.0
    """Learning-rate multiplier of the text tower's trainable parameters (not its head)."""
    locked_head_trainable: bool = True
    """Whether the projection head of a locked tower trains. False freezes it as the identity,
    which needs ``embed_dim`` equal to the locked tower's width; that is big_vision's LiT
    default (no image head, the text head projects to the image width; docs/towers.md)."""
    image_unlock_after_steps: int = 0
    """Delayed unlocking: a U image tower stays locked for the first N steps (0 = never)."""
    text_unlock_after_steps: int = 0
    """Delayed unlocking: a U text tower stays locked for the first N steps (0 = never)."""
    third_tower: str = ""
    """3T only: registry name of the frozen pretrained image model h; "" = ``image_tower``."""
    third_pretrained: str = ""
    """3T only: local checkpoint of the third tower (same formats as ``image_pretrained``)."""

    def __post_init__(self) -> None:
        # Unknown names raise ValueError naming the closest valid tower.
        image_tower_spec(self.image_tower)
        text_tower_spec(self.text_tower)
        if self.embed_dim <= 0:
            raise ValueError(f"model.embed_dim must be positive, got {self.embed_dim}")
        if self.max_logit_scale <= 0:
            raise ValueError(f"model.max_logit_scale must be positive, got {self.max_logit_scale}")
        if math.exp(self.init_logit_scale) > self.max_logit_scale:
            raise ValueError(
                f"exp(model.init_logit_scale)={math.exp(self.init_logit_scale):.3g} exceeds "
                f"model.max_logit_scale={self.max_logit_scale}: the clamp would block its gradient"
            )
        if self.init_logit_scale_3t and math.exp(self.init_logit_scale_3t) > self.max_logit_scale:
            raise ValueError(
                f"exp(model.init_logit_scale_3t)={math.exp(self.init_logit_scale_3t):.3g} exceeds "
                f"model.max_logit_scale={self.max_logit_scale}: the clamp would block its gradient"
            )
        if self.text_pooling not in ("",) + TEXT_POOLINGS:
            raise ValueError(
                f"model.text_pooling must be '' or one of {TEXT_POOLINGS}, "
                f"got {self.text_pooling!r}"
            )
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size must be >= 0, got {self.vocab_size}")
        # Imported here: settings.py imports this module's ModelConfig for type hints only.
        from .settings import validate_setting

        validate_setting(self)
