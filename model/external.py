"""Towers named by a library's own name: ``timm:<model name>`` (any timm model, its spec read off
the model built on the meta device) and ``hf:<folder>`` (any local transformers encoder folder,
read from its ``config.json``); and ``image_spec_at``, a spec rebuilt for another input size.

``registry.py`` resolves names with these prefixes here; the registry's own entries spell out
every size by hand."""

from __future__ import annotations

import dataclasses
import difflib
import functools

from .specs import BERT_UNCASED_VOCAB_SIZE, HALF, ImageTowerSpec, TextTowerSpec

TIMM_PREFIX = "timm:"
"""``model.image.tower=timm:<name>`` names any timm model (built with ``pretrained=False``)."""


def _timm_module(spec: ImageTowerSpec) -> str:
    """The ``timm.models`` module that builds the spec's model (``vision_transformer``, ...)."""
    if spec.arch == "timm_vit":
        return "timm.models.vision_transformer"
    if spec.timm_class:
        return spec.timm_class.rpartition(".")[0]
    import timm.models

    return timm.models.model_entrypoint(spec.timm_name).__module__ if timm.models.is_model(spec.timm_name) else ""


def image_spec_at(spec: ImageTowerSpec, image_size: int) -> ImageTowerSpec:
    """``spec`` built for ``image_size`` px inputs (0 or its own size: ``spec`` itself).

    A timm ``VisionTransformer`` (registry ViTs, ``timm:vit_*``) is built at the new size
    (timm's ``img_size=``; the patch size must divide it) and its pretrained weights get their
    absolute position embeddings resampled to the new grid when loaded (``model/pretrained.py``).
    Convolutional towers (ResNet, BiT, EfficientNet) take any size as built. Other patch models
    are refused with the reason (MLP-Mixer: its token-mixing MLP is sized for one token count).
    ValueError naming the tower, the size and the fix.
    """
    if image_size < 0:
        raise ValueError(f"image size must be >= 0 (0 = the tower's own), got {image_size}")
    if not image_size or image_size == spec.image_size:
        return spec
    module = _timm_module(spec)
    if module == "timm.models.vision_transformer":
        if image_size % spec.patch_size:
            below = image_size // spec.patch_size * spec.patch_size
            nearest = f"{below} or {below + spec.patch_size}" if below else str(spec.patch_size)
            raise ValueError(
                f"image size {image_size} is not a multiple of the {spec.patch_size} px patches of "
                f"{spec.name} (built for {spec.image_size} px); use e.g. {nearest}"
            )
        if spec.arch == "timm_vit":  # timm_kwargs() passes img_size=spec.image_size
            return dataclasses.replace(spec, image_size=image_size)
        args = tuple((k, v) for k, v in spec.timm_args if k != "img_size") + (("img_size", image_size),)
        return dataclasses.replace(spec, image_size=image_size, timm_args=args)
    if module == "timm.models.mlp_mixer":
        tokens = f"exactly {(spec.image_size // spec.patch_size) ** 2}" if spec.patch_size else "a fixed number of"
        raise ValueError(
            f"{spec.name} is an MLP-Mixer built for {spec.image_size} px: its token-mixing MLPs are "
            f"sized for {tokens} patch tokens, so it cannot run on {image_size} px images (there is "
            "no position table to resample); leave the image size at 0 or use a ViT tower"
        )
    if spec.patch_size:
        raise ValueError(
            f"{spec.name} is a patch model built for {spec.image_size} px ({module or spec.timm_name}); "
            f"building it at {image_size} px with resampled position embeddings is wired for timm "
            "VisionTransformer towers only; leave the image size at 0 or name a tower of that size"
        )
    return dataclasses.replace(spec, image_size=image_size)  # a convolutional tower takes any size


@functools.cache
def timm_spec(timm_name: str) -> ImageTowerSpec:
    """The spec of any timm model, read off the model itself (built on the meta device, so no
    memory is allocated and nothing is downloaded): width = ``num_features``; image size, mean,
    std and interpolation from timm's pretrained config of that name (what its published weights expect);
    the unlockable units and final norm from timm's own parameter-group matcher
    (``group_matcher(coarse=True)``: ``blocks.N`` / ``stages.N`` / ``layerN`` and the modules
    it groups after the last unit). The tower's module is ``.trunk``."""
    import re

    import timm
    import torch

    if not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=5, cutoff=0.5)
        hint = f" Closest timm models: {close}." if close else ""
        raise ValueError(f"Unknown timm model {timm_name!r} (model.image_tower=timm:{timm_name}).{hint}")
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    config = model.pretrained_cfg
    names = [name for name, _ in model.named_parameters()]
    matcher = model.group_matcher(coarse=True) if hasattr(model, "group_matcher") else {}
    blocks = matcher.get("blocks", [])
    patterns = [blocks] if isinstance(blocks, str) else [p for p, order in blocks if order is None or order[0] < 99999]
    tail = [p for p, order in ([] if isinstance(blocks, str) else blocks) if order and order[0] >= 99999]
    prefix, units = "", 0
    for pattern in patterns:
        found = re.match(r"^\^?([A-Za-z_.]+?)(\\\.)?\(\\d\+\)", pattern)
        if found:
            prefix = found.group(1) + ("." if found.group(2) else "")
            indices = {int(m.group(1)) for n in names if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))}
            start, units = (min(indices), len(indices)) if indices else (0, 0)
            break
    final = tuple(
        f"trunk.{module}"
        for pattern in tail
        for module in pattern.removeprefix("^").split("|")
        if re.fullmatch(r"[A-Za-z_.0-9]+", module) and any(n.startswith(f"{module}.") for n in names)
    )
    if not tail and "norm.weight" in names:
        final = ("trunk.norm",)
    mean, std = tuple(config.get("mean", HALF)), tuple(config.get("std", HALF))
    return ImageTowerSpec(
        f"{TIMM_PREFIX}{timm_name}",
        "timm",
        timm_name,
        int(config.get("input_size", (3, 224, 224))[-1]),
        int(model.num_features),
        mean,
        std,
        interpolation=str(config.get("interpolation") or "bicubic"),
        patch_size=int(getattr(getattr(model, "patch_embed", None), "patch_size", (0,))[0]),
        block_prefix=f"trunk.{prefix}" if units else "",
        block_start=start if units else 0,
        num_blocks=units,
        final_norm=final,
    )


HF_PREFIX = "hf:"
"""``model.text.tower=hf:<folder>`` names a local transformers encoder folder (never a hub id)."""

# model_type in config.json -> (arch, default pooling). BERT-like encoders without a family of
# their own run through transformers' AutoModel (arch ``hf``, module ``.hf``).
HF_FAMILIES = {
    "bert": ("bert", "mean"),
    "roberta": ("hf", "mean"),
    "xlm-roberta": ("hf", "mean"),
    "distilbert": ("hf", "mean"),
    "mpnet": ("hf", "mean"),
    "t5": ("t5", "mean"),
    "mt5": ("mt5", "mean"),
    "clip_text_model": ("clip_text", "eot"),
    "clip": ("clip_text", "eot"),
}


@functools.cache
def hf_spec(folder: str, context_length: int = 64) -> TextTowerSpec:
    """The spec of a local transformers folder, read from its ``config.json``: family from
    ``model_type`` (``HF_FAMILIES``), sizes from the config, the folder itself as the pretrained
    source (its tokenizer too). Captions are cut to ``context_length`` tokens (at most the
    model's positions; CLIP text: its 77)."""
    import json
    from pathlib import Path

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text tower hf:{folder}: no config.json in {path} (a local transformers folder)")
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config", config) if config.get("model_type") == "clip" else config
    model_type = config.get("model_type", "")
    if model_type not in HF_FAMILIES:
        raise ValueError(
            f"text tower hf:{folder}: model_type {model_type!r} is not supported; supported: {sorted(HF_FAMILIES)}"
        )
    arch, pooling = HF_FAMILIES[model_type]
    width = config.get("hidden_size", config.get("d_model", config.get("dim")))
    depth = config.get("num_hidden_layers", config.get("num_layers", config.get("n_layers")))
    heads = config.get("num_attention_heads", config.get("num_heads", config.get("n_heads")))
    ffn = config.get("intermediate_size", config.get("d_ff", config.get("hidden_dim", 4 * width)))
    positions = config.get("max_position_embeddings", 512)
    # RoBERTa-style position ids start after the padding index: two rows are not usable.
    usable = positions - 2 if model_type in ("roberta", "xlm-roberta") else positions
    context = min(context_length, usable) if arch != "t5" and arch != "mt5" else context_length
    layer_prefix = {
        "bert": "bert.encoder.layer.",
        "t5": "t5.encoder.block.",
        "mt5": "t5.encoder.block.",
        "clip_text": "clip.encoder.layers.",
    }.get(arch, "hf.transformer.layer." if model_type == "distilbert" else "hf.encoder.layer.")
    return TextTowerSpec(
        f"{HF_PREFIX}{folder}",
        arch,
        int(width),
        int(depth),
        int(heads),
        int(ffn),
        int(context),
        int(positions),
        float(config.get("hidden_dropout_prob", config.get("dropout_rate", config.get("dropout", 0.1))) or 0.0),
        int(config.get("vocab_size", BERT_UNCASED_VOCAB_SIZE)),
        pooling=pooling,
        ff_proj=config.get("feed_forward_proj", ""),
        pretrained_dir=str(path),
        block_prefix=layer_prefix,
    )
