"""The per-tower sections of the model config: one shape for the image, text and third tower.

Users write ``--model.image.tower=timm:vit_base_patch16_clip_224 --model.image.pretrained=PATH``
or, in a YAML config, ``model: {image: {tower: ..., pretrained: ...}}``. ``TowerSection``
documents the options (``--help`` prints it per tower); ``TOWER_FIELDS`` says which flat field of
``ModelConfig`` stores each (``model.image.tower`` -> ``model.image_tower``; the flat names stay
the Python attributes, the keys of configs saved in checkpoints, and command-line aliases).
An option that does not apply to a tower is refused, naming why (``NOT_FOR``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

TOWER_ROLES = ("image", "text", "third")


@dataclass
class TowerSection:
    """One tower's options, the same shape for the image, text and third tower
    (``--model.<tower>.<option>=...``). Whether a pretrained tower is locked (L), unlocked (U) or
    trained from scratch (u) is ``model.setting``'s letter; an option that does not apply to a
    tower is refused, naming why."""

    tower: str = ""
    """Architecture: a registry name (``vit_base_patch16_224``, ``bert_base``, ``minilm_l6``),
    ``timm:<model name>`` (image) or ``hf:<local transformers folder>`` (text). The third tower's
    "" = the image tower's."""
    pretrained: str = ""
    """Local weights of an L/U tower: an image state dict (``.safetensors``/``.pth``/``.bin``, timm,
    open_clip or OpenAI-CLIP layout, big_vision ``.npz``) or a transformers folder (text;
    ``package:<name>`` too). Required for L/U unless the tower names a default; refused for u."""
    unlock_last_blocks: int = 0
    """Partial unlocking of a locked (L) tower: its last N blocks (and final norm) train."""
    unlock_after_steps: int = 0
    """Delayed unlocking of an unlocked pretrained (U) tower: locked for its first N steps."""
    lr_mult: float = 1.0
    """Learning-rate multiplier of the tower's trainable parameters (not its head)."""
    grad_checkpointing: bool = False
    """Recompute the tower's block activations in the backward pass."""
    image_size: int = 0
    """Image towers: input side in pixels; 0 = the weights' pretrained config's."""
    mean: tuple[float, ...] = ()
    """Image towers: normalisation mean (R,G,B), e.g. ``0.5,0.5,0.5``; () = the pretrained config's.
    An override that differs from it warns at start, naming both."""
    std: tuple[float, ...] = ()
    """Image towers: normalisation std (R,G,B); () = the pretrained config's."""
    patch_dropout: float = 0.0
    """ViT image towers that train: FLIP's fraction of patch tokens dropped in training."""
    drop_path: float = 0.0
    """ViT image towers that train: stochastic-depth rate of the last block."""
    pooling: str = ""
    """Text towers: ``mean``, ``cls`` (BERT) or ``eot`` (CLIP text); "" = the family's own."""


# Where each per-tower option is stored (the flat field, also its command-line alias). Options
# missing from a tower's table do not apply to it; NOT_FOR says why.
TOWER_FIELDS: dict[str, dict[str, str]] = {
    "image": {
        "tower": "image_tower",
        "pretrained": "image_pretrained",
        "unlock_last_blocks": "image_unlock_last_blocks",
        "unlock_after_steps": "image_unlock_after_steps",
        "lr_mult": "image_lr_mult",
        "grad_checkpointing": "image_grad_checkpointing",
        "image_size": "image_size",
        "mean": "image_mean",
        "std": "image_std",
        "patch_dropout": "image_patch_dropout",
        "drop_path": "image_drop_path",
    },
    "text": {
        "tower": "text_tower",
        "pretrained": "text_pretrained",
        "unlock_last_blocks": "text_unlock_last_blocks",
        "unlock_after_steps": "text_unlock_after_steps",
        "lr_mult": "text_lr_mult",
        "grad_checkpointing": "text_grad_checkpointing",
        "pooling": "text_pooling",
    },
    "third": {"tower": "third_tower", "pretrained": "third_pretrained"},
}
NOT_FOR = {
    "image": "an image tower pools as its architecture does (pooling is a text-tower option)",
    "text": "it is an image-tower option (input size, normalisation, patch dropout, drop-path)",
    "third": (
        "the third tower is always locked and sees the image tower's inputs (3T's frozen h: "
        "no trainable parameters, no own preprocessing); set model.image.* for the inputs"
    ),
}


def tower_field(role: str, option: str) -> str:
    """The flat field that stores ``model.<role>.<option>``; ValueError naming why an option does
    not apply to the tower, or the closest valid name."""
    if role not in TOWER_FIELDS:
        close = difflib.get_close_matches(role, TOWER_ROLES, n=1, cutoff=0.0)
        raise ValueError(f"unknown tower section 'model.{role}' (did you mean 'model.{close[0]}'?)")
    options = [f.name for f in dataclasses.fields(TowerSection)]
    if option not in options:
        close = difflib.get_close_matches(option, options, n=1, cutoff=0.0)
        raise ValueError(f"unknown option 'model.{role}.{option}' (did you mean 'model.{role}.{close[0]}'?)")
    if option not in TOWER_FIELDS[role]:
        raise ValueError(f"model.{role}.{option} does not apply to the {role} tower: {NOT_FOR[role]}")
    return TOWER_FIELDS[role][option]


def tower_aliases() -> dict[str, str]:
    """{flat field: per-tower key}, e.g. ``image_tower`` -> ``image.tower`` (documented aliases)."""
    return {field: f"{role}.{option}" for role, fields in TOWER_FIELDS.items() for option, field in fields.items()}
