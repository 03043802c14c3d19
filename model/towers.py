"""Image and text towers: thin wrappers that turn a registry spec into a module returning one
pooled feature vector per example. Image towers are timm models (ViT, ResNet, BiT, Mixer); text
towers are transformers encoders (BERT, T5/mT5 encoder, CLIP text transformer).

Both are built from configs only (``pretrained=False``, no hub name ever reaches a library), so
nothing is downloaded. Pretrained weights, when wanted, are loaded later from local files.
"""

from __future__ import annotations

import importlib

import timm
import torch
from torch import nn
from transformers import BertConfig, BertModel

from .registry import (
    TEXT_POOLINGS,
    ImageTowerSpec,
    TextTowerSpec,
    image_spec_at,
    image_tower_spec,
    text_tower_spec,
    tower_spec,
)

IMAGE_ARCHS = ("timm_vit", "timm")
TEXT_ARCHS = ("bert", "t5", "mt5", "clip_text", "hf")


class ImageTower(nn.Module):
    """A timm model without classifier head: images [B,3,H,W] -> pooled features [B,width].

    The timm module is ``.vit`` for the ``timm_vit`` family and ``.trunk`` for other timm models
    (the name open_clip uses for timm backbones), so lock regexes read naturally.
    """

    def __init__(self, spec: ImageTowerSpec) -> None:
        super().__init__()
        if spec.arch not in IMAGE_ARCHS:
            raise ValueError(f"ImageTower cannot build arch {spec.arch!r} of {spec.name!r}")
        self.spec = spec
        self.width = spec.width
        # num_classes=0 makes the head an Identity, so the output is the pooled (and, for
        # global_pool="avg", fc-normed) features.
        if spec.timm_class:
            module = _timm_class(spec.timm_class)(num_classes=0, **spec.timm_kwargs())
        else:
            module = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.timm_kwargs())
        if module.num_features != spec.width:
            raise ValueError(f"{spec.name}: timm built {module.num_features} features, the spec says {spec.width}")
        setattr(self, "vit" if spec.arch == "timm_vit" else "trunk", module)

    @property
    def model(self) -> nn.Module:
        """The timm module (``.vit`` or ``.trunk``)."""
        return self.vit if self.spec.arch == "timm_vit" else self.trunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W], already normalised with ``spec.mean``/``spec.std`` -> [B,width]."""
        return self.model(images)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (timm's own checkpointing)."""
        self.model.set_grad_checkpointing(enable)

    def set_regularisation(self, patch_dropout: float = 0.0, drop_path: float = 0.0) -> None:
        """FLIP's patch dropout and stochastic depth on a ViT tower (built or loaded), in training
        mode only: evaluation sees every patch and every block.

        ``patch_dropout``: the fraction of patch tokens dropped per image after the position
        embedding (timm's ``PatchDropout``, open_clip's ``patch_dropout``; a class token is kept),
        so the blocks run on ``(1 - p)`` of the tokens. ``drop_path``: timm's ``drop_path_rate``,
        the rate of the last block, rising linearly from 0 at the first. Neither has parameters,
        so checkpoints and pretrained weights are unchanged.
        """
        from timm.layers import DropPath, PatchDropout

        if (patch_dropout or drop_path) and self.spec.arch != "timm_vit":
            raise ValueError(f"patch dropout and drop-path apply to ViT towers, not {self.spec.name!r}")
        if not (0.0 <= patch_dropout < 1.0 and 0.0 <= drop_path < 1.0):
            raise ValueError(f"patch_dropout={patch_dropout} and drop_path={drop_path} must be in [0, 1)")
        if self.spec.arch != "timm_vit":
            return
        vit = self.vit
        vit.patch_drop = (
            PatchDropout(patch_dropout, num_prefix_tokens=vit.num_prefix_tokens) if patch_dropout else nn.Identity()
        )
        depth = len(vit.blocks)
        for index, block in enumerate(vit.blocks):
            rate = drop_path * index / max(1, depth - 1)  # timm's linspace(0, drop_path_rate, depth)
            block.drop_path1 = DropPath(rate) if rate else nn.Identity()
            block.drop_path2 = DropPath(rate) if rate else nn.Identity()


def _timm_class(path: str) -> type:
    # Only timm classes: a registry entry must not be able to import arbitrary code.
    module, _, name = path.rpartition(".")
    if not module.startswith("timm.models"):
        raise ValueError(f"timm_class must live under timm.models, got {path!r}")
    return getattr(importlib.import_module(module), name)


class TextTower(nn.Module):
    """A transformers text encoder: token ids [B,L] -> pooled features [B,width].

    The encoder is ``.bert`` (BertModel, no pooler), ``.t5`` (T5/MT5EncoderModel) or ``.clip``
    (CLIPTextModel), named after its family so lock regexes read naturally. ``encoder`` may be
    a loaded pretrained model of the spec's family (see ``model/pretrained.py``).
    """

    def __init__(
        self,
        spec: TextTowerSpec,
        vocab_size: int,
        pooling: str = "mean",
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if spec.arch not in TEXT_ARCHS:
            raise ValueError(f"TextTower cannot build arch {spec.arch!r} of {spec.name!r}")
        pooling = pooling or spec.pooling
        if pooling not in TEXT_POOLINGS:
            raise ValueError(f"pooling must be one of {TEXT_POOLINGS}, got {pooling!r}")
        if pooling == "cls" and spec.arch not in ("bert", "hf"):
            raise ValueError(f"{spec.name}: only BERT has a CLS token; use 'mean' or 'eot'")
        self.spec = spec
        self.width = spec.width
        self.pooling = pooling
        self.vocab_rows = vocab_size  # rows of the token table: the tokenizer must fit in it
        self.attr = {"bert": "bert", "t5": "t5", "mt5": "t5", "clip_text": "clip", "hf": "hf"}[spec.arch]
        setattr(self, self.attr, encoder if encoder is not None else _encoder(spec, vocab_size))

    @property
    def model(self) -> nn.Module:
        """The transformers encoder (``.bert``, ``.t5`` or ``.clip``)."""
        return getattr(self, self.attr)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B,L] (mask 1 = real token, 0 = padding) -> [B,width].

        Columns that are padding in every row of the batch are dropped first: they are masked
        keys and no real token's output depends on them, so the result is the same, and a batch of
        short captions (alt-text of 10-20 tokens under a 64-token context) costs what its longest
        caption needs instead of the full context."""
        input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        # CLIPTextModel adds its causal mask itself; T5 and BERT attend both ways.
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]  # [B,L,W] -> [B,W]
        if self.pooling == "eot":
            # The last real token (the tokenizer's end-of-text): under the causal mask it is the
            # only position that has seen the whole caption.
            last = attention_mask.sum(dim=1).clamp(min=1) - 1  # [B]
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return masked_mean(hidden, attention_mask)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in backward (transformers' checkpointing).

        Non-reentrant checkpointing: the reentrant variant drops the gradients of parameters
        whose checkpointed inputs do not require grad. transformers only checkpoints in
        training mode, and enabling it also hooks the input embeddings to require grad.
        """
        model = self.model
        # transformers 5 renamed gradient_* to activation_checkpointing_*; the old names warn
        # and go away in v6, while setup.py still admits 4.x, which only has the old ones.
        if hasattr(model, "activation_checkpointing_enable"):
            if enable:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.activation_checkpointing_disable()
        elif enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()


def _encoder(spec: TextTowerSpec, vocab_size: int) -> nn.Module:
    """A randomly initialised transformers encoder of the spec's family."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        MT5Config,
        MT5EncoderModel,
        T5Config,
        T5EncoderModel,
    )

    if spec.arch == "bert":
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=spec.width,
            num_hidden_layers=spec.depth,
            num_attention_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=spec.max_position_embeddings,
            hidden_dropout_prob=spec.dropout,
            attention_probs_dropout_prob=spec.dropout,
            # Named explicitly so the attention kernel is not resolved differently per version.
            attn_implementation="sdpa",
            # Captions are encoded whole; a key-value cache only serves decoding.
            use_cache=False,
        )
        # The pooler (a tanh Linear on the CLS token, trained for next-sentence prediction) is
        # not used by either pooling here; leaving it out avoids parameters without gradient.
        return BertModel(config, add_pooling_layer=False)
    if spec.arch == "hf":
        # An encoder family without a class of its own here (RoBERTa, XLM-R, DistilBERT, MPNet):
        # transformers' own config of the folder, randomly initialised.
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(spec.pretrained_dir, local_files_only=True)
        return AutoModel.from_config(config, **_no_pooler(config))
    if spec.arch in ("t5", "mt5"):
        config_class, model_class = (T5Config, T5EncoderModel) if spec.arch == "t5" else (MT5Config, MT5EncoderModel)
        config = config_class(
            vocab_size=vocab_size,
            d_model=spec.width,
            d_kv=spec.width // spec.num_heads,
            d_ff=spec.intermediate_size,
            num_layers=spec.depth,
            num_heads=spec.num_heads,
            dropout_rate=spec.dropout,
            feed_forward_proj=spec.ff_proj,
            is_encoder_decoder=False,
            use_cache=False,
        )
        return model_class(config)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=spec.width,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        attention_dropout=spec.dropout,
        attn_implementation="sdpa",
    )
    return unwrap_clip_text(CLIPTextModel(config))


def _no_pooler(config: object) -> dict:
    """``add_pooling_layer=False`` for the families that have the (unused) CLS pooler."""
    return {"add_pooling_layer": False} if getattr(config, "model_type", "") in ("roberta", "xlm-roberta") else {}


def unwrap_clip_text(model: nn.Module) -> nn.Module:
    """transformers 4.x nests CLIP's text transformer as ``.text_model``; 5.x does not. Keeping
    the inner module gives the same parameter names (``clip.encoder.layers.*``) under both."""
    return getattr(model, "text_model", model)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns of input_ids, attention_mask [B,L] that are padding (mask 0) in
    every row -> [B,L'], L' = one past the last column with a real token in any row (at least 1).

    Only trailing columns go, so left-padded batches and position ids are untouched. One host
    sync per call (the length); on a GPU that is microseconds against a tower's forward."""
    if attention_mask.dim() != 2 or attention_mask.shape != input_ids.shape:
        return input_ids, attention_mask
    used = attention_mask.ne(0).any(dim=0)  # [L]: some row has a real token in this column
    positions = torch.arange(1, used.numel() + 1, device=used.device)
    length = max(1, int((used * positions).max()))  # one past the last used column
    if length == attention_mask.shape[1]:
        return input_ids, attention_mask
    return input_ids[:, :length], attention_mask[:, :length]


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden [B,L,W] over the positions where attention_mask [B,L] is nonzero -> [B,W].

    A row with no real token yields zeros instead of NaN (the count is clamped to 1).
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B,L] -> [B,L,1]
    total = (hidden * mask).sum(dim=1)  # [B,W]
    count = mask.sum(dim=1).clamp(min=1.0)  # [B,1]
    return total / count


def build_image_tower(name: str, image_size: int = 0) -> ImageTower:
    """The image tower registered as ``name``, randomly initialised; ``image_size`` > 0 builds it
    for that input side (a ViT's position table sized for it: ``registry.image_spec_at``)."""
    return ImageTower(image_spec_at(image_tower_spec(name), image_size))


def build_text_tower(name: str, vocab_size: int | None = None, pooling: str = "") -> TextTower:
    """The text tower registered as ``name``, randomly initialised.

    ``vocab_size`` is the tokenizer's vocabulary size; None keeps the spec's (30522 for BERT).
    ``pooling`` "" takes the family's (``spec.pooling``: mean, or eot for CLIP text).
    """
    spec = text_tower_spec(name)
    return TextTower(spec, vocab_size or spec.vocab_size, pooling=pooling)


def count_parameters(name: str, vocab_size: int | None = None, image_size: int = 0) -> int:
    """Parameters of tower ``name`` as built for training (no classifier head, no BERT pooler).

    The tower is built on the ``meta`` device, so even ViT-g/14 allocates no memory.
    ``vocab_size`` applies to text towers only (default: the spec's 30522); ``image_size`` to
    image towers only (0: the spec's; a ViT's position table grows with it).
    """
    spec = tower_spec(name)
    with torch.device("meta"):
        if isinstance(spec, ImageTowerSpec):
            if vocab_size is not None:
                raise ValueError(f"vocab_size applies to text towers only, not {name!r}")
            tower = build_image_tower(name, image_size)
        else:
            tower = build_text_tower(name, vocab_size=vocab_size)
    return sum(p.numel() for p in tower.parameters())
