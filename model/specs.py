"""Tower specs: the dataclasses that spell out one image or text tower's architecture, and the
normalisation and vocabulary constants they use. The named entries live in ``registry.py``; specs
read off a library's own model (``timm:<name>``, ``hf:<folder>``) in ``external.py``."""

from __future__ import annotations

from dataclasses import dataclass

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
    interpolation: str = "bicubic"
    """Resampling of the evaluation resize (timm's pretrained config's; bicubic as CLIP's)."""
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
    """The family's pooling when ``model.text.pooling`` is empty: ``mean`` (BERT, T5) or
    ``eot`` (CLIP text: the last real token's state, i.e. the end-of-text token)."""
    ff_proj: str = ""
    """T5 feed-forward type (``relu`` for T5 1.0, ``gated-gelu`` for T5 1.1 and mT5)."""
    pretrained_dir: str = ""
    """Default local source of pretrained weights when the tower is L or U and
    ``model.text.pretrained`` is empty: a folder or ``package:<python package>`` (its ``model/``)."""
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
"""Text poolings a tower can use (``model.text.pooling``; ``towers.py`` implements them)."""
