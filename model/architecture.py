"""The exported model's architecture rebuilt from its ``config.json`` (placeholder weights):
what ``tritower.inference.load_export`` fills with the exported tensors."""

from __future__ import annotations

import transformers

from .clip import CLIPModel
from .config import ModelConfig
from .locked import LockedTower
from .pretrained import text_model_class
from .registry import image_tower_spec, text_tower_spec
from .towers import TextTower, build_image_tower, build_text_tower, unwrap_clip_text

FORMAT = "tritower-export"
"""``config.json["format"]`` of a native export."""


def build_architecture(config: dict) -> CLIPModel:
    """The exported model's modules with placeholder weights, from ``config.json`` alone.

    Towers are built from their registry specs (never from pretrained files, which the
    inference machine need not have); a pretrained text encoder is rebuilt from its own saved
    transformers config, whose architecture may differ in details from the registry's.
    """
    cfg = ModelConfig.from_dict(config["model"])
    image_tower = build_image_tower(cfg.image.tower, cfg.parsed.image.image_size)  # a ViT at model.image.image_size
    if config.get("text_encoder_config"):
        spec = text_tower_spec(cfg.text.tower)
        saved = dict(config["text_encoder_config"])
        encoder_config = transformers.AutoConfig.for_model(saved.pop("model_type"), **saved)
        kwargs = {"add_pooling_layer": False} if spec.arch == "bert" else {}
        encoder = text_model_class(spec.arch)(encoder_config, **kwargs)
        if spec.arch == "clip_text":
            encoder = unwrap_clip_text(encoder)
        text_tower = TextTower(spec, config["vocab_rows"], config["text_pooling"], encoder=encoder)
    else:
        text_tower = build_text_tower(cfg.text.tower, config["vocab_rows"], pooling=config["text_pooling"])
    # A 3T run exported without --alpha is a plain CLIP: no 3T heads (config "three_towers" null).
    mixed = cfg.parsed.three_towers and bool(config.get("three_towers"))
    third = image_tower_spec(cfg.third.tower or cfg.image.tower).width if mixed else 0
    return CLIPModel(
        image_tower,
        text_tower,
        cfg.embed_dim,
        cfg.init_logit_scale,
        cfg.max_logit_scale,
        third_width=third,
        logit_bias=0.0 if config.get("logit_bias") else None,
    )


def build_third_tower_architecture(config: dict) -> LockedTower:
    """The third tower h of an alpha-mixed 3T export, placeholder weights, from its registry spec."""
    name = config["three_towers"]["third_tower"]
    return LockedTower(build_image_tower(name), name, source=config["three_towers"].get("third_source", ""))
