"""The two-tower CLIP model: image tower and text tower, each followed by a linear projection
into a shared embedding space, plus CLIP's learnable temperature.

LiT and Three Towers use this same module; what is locked is decided by regex rules over the
parameter names, so the submodule names below are part of the interface:
``image_tower.*``, ``text_tower.*``, ``image_proj.*``, ``text_proj.*``, ``logit_scale``, under 3T
``image_proj_3t.*``, ``text_proj_3t.*``, ``third_proj_image.*``, ``third_proj_text.*``,
``logit_scale_3t``, and with a SigLIP loss ``logit_bias``.

Three Towers in the paper's notation (Kossen et al. 2023; docs/towers.md): f(x) and g(t) are the
unit-norm image and text embeddings (tower, then ``image_proj`` / ``text_proj``), h(x) the frozen
third tower's output (computed outside, ``locked.py``). f_h = ``image_proj_3t`` and g_h =
``text_proj_3t`` act on f(x) and g(t); h_f = ``third_proj_image`` and h_g = ``third_proj_text``
act on h(x); every head output is L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .registry import image_tower_spec
from .towers import ImageTower, TextTower, build_image_tower, build_text_tower


class CLIPModel(nn.Module):
    """Image tower + text tower + bias-free projections + log-temperature ``logit_scale``.

    Under 3T (``third_width`` > 0) it also holds the four Three Towers heads, all bias-free
    linear maps into ``embed_dim``: f_h = ``image_proj_3t`` on f(x), g_h = ``text_proj_3t`` on
    g(t), h_f = ``third_proj_image`` and h_g = ``third_proj_text`` on the frozen third tower's
    output h(x) (computed outside, see ``locked.py``); and ``logit_scale_3t`` [2], the
    log-temperatures of the f_h-h_f and g_h-h_g losses (initialised to ``init_logit_scale_3t``,
    default ``init_logit_scale``).

    ``logit_bias`` (a float) adds SigLIP's learnable bias, a [1] parameter of that initial value.

    A tower held outside the model as a ``LockedTower`` is ``None`` here; its precomputed
    features are passed as ``image_embeddings`` / ``text_embeddings`` instead.
    """

    def __init__(
        self,
        image_tower: ImageTower,
        text_tower: TextTower,
        embed_dim: int,
        init_logit_scale: float,
        max_logit_scale: float,
        third_width: int = 0,
        init_logit_scale_3t: float | None = None,
        logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_width, self.text_width = image_tower.width, text_tower.width
        self.image_proj = nn.Linear(image_tower.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_tower.width, embed_dim, bias=False)
        # CLIP initialises its projections with std width**-0.5, which keeps the projected
        # features at unit scale whatever the tower width.
        nn.init.normal_(self.image_proj.weight, std=image_tower.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text_tower.width**-0.5)
        # Shape [1], never 0-dim: DeepSpeed's broadcast, zero.Init and GatheredParameters all
        # view parameters as bytes and crash on a 0-dim tensor.
        self.logit_scale = nn.Parameter(torch.full([1], float(init_logit_scale)))
        self.max_logit_scale = float(max_logit_scale)
        self.embed_dim = embed_dim
        self.logit_bias = nn.Parameter(torch.full([1], float(logit_bias))) if logit_bias is not None else None
        self.three_towers = third_width > 0
        if self.three_towers:
            # f_h, g_h act on the embeddings f(x), g(t) (the paper's heads "on top of" the main
            # towers), h_f, h_g on the third tower's output; docs/towers.md lists this reading.
            self.image_proj_3t = _head(embed_dim, embed_dim)
            self.text_proj_3t = _head(embed_dim, embed_dim)
            self.third_proj_image = _head(third_width, embed_dim)
            self.third_proj_text = _head(third_width, embed_dim)
            start = init_logit_scale if init_logit_scale_3t is None else init_logit_scale_3t
            self.logit_scale_3t = nn.Parameter(torch.full([2], float(start)))

    def _image_embeddings(self, images: torch.Tensor | None, embeddings: torch.Tensor | None) -> torch.Tensor:
        if (images is None) == (embeddings is None):
            raise ValueError("pass exactly one of images and image_embeddings")
        if embeddings is not None:
            return embeddings
        if self.image_tower is None:
            raise ValueError(
                "the image tower is held outside the model (locked): pass image_embeddings from its LockedTower"
            )
        return self.image_tower(images)

    def _text_embeddings(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        embeddings: torch.Tensor | None,
    ) -> torch.Tensor:
        if (input_ids is None) == (embeddings is None):
            raise ValueError("pass exactly one of input_ids and text_embeddings")
        if embeddings is not None:
            return embeddings
        if self.text_tower is None:
            raise ValueError(
                "the text tower is held outside the model (locked): pass text_embeddings from its LockedTower"
            )
        return self.text_tower(input_ids, attention_mask)

    def encode_image(
        self,
        images: torch.Tensor | None = None,
        normalize: bool = True,
        image_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images [B,3,H,W] (or the tower's output ``image_embeddings`` [B,width]) ->
        embeddings [B,embed_dim], L2-normalised by default."""
        features = self.image_proj(self._image_embeddings(images, image_embeddings))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        normalize: bool = True,
        text_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask [B,L] (or the tower's output ``text_embeddings`` [B,width])
        -> embeddings [B,embed_dim], L2-normalised by default."""
        features = self.text_proj(self._text_embeddings(input_ids, attention_mask, text_embeddings))
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped to ``max_logit_scale``, shape [1].

        The clamp, as in CLIP, stops the softmax turning one-hot; above it the temperature
        gets no gradient and stays at the bound.
        """
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(
        self,
        images: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        image_embeddings: torch.Tensor | None = None,
        text_embeddings: torch.Tensor | None = None,
        third_embeddings: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unit-norm ``image_features`` [B,D], ``text_features`` [B,D] and ``logit_scale`` [1]
        (already exponentiated and clamped: the loss multiplies the cosine similarities by it).

        ``image_embeddings`` / ``text_embeddings`` replace ``images`` / ``input_ids`` with a
        tower's output [B,width] (a locked tower run outside the model, or precomputed).
        Under 3T, ``third_embeddings`` [B,third width] (h(x), the frozen third tower's output)
        is required and the result adds the unit-norm [B,D] ``image_features_3t`` f_h(f(x)),
        ``text_features_3t`` g_h(g(t)), ``third_image_features`` h_f(h(x)),
        ``third_text_features`` h_g(h(x)), and ``logit_scale_3t`` [2] (exponentiated and clamped
        as ``logit_scale``: the f_h-h_f term's, then the g_h-h_g term's). A model built with
        ``logit_bias`` also returns ``logit_bias`` [1].

        Temperatures are returned from inside forward because under ZeRO-3 a parameter read
        outside forward is an empty placeholder.
        """
        image = self._image_embeddings(images, image_embeddings)
        text = self._text_embeddings(input_ids, attention_mask, text_embeddings)
        out = {
            "image_features": F.normalize(self.image_proj(image), dim=-1),
            "text_features": F.normalize(self.text_proj(text), dim=-1),
            "logit_scale": self.scale(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if self.three_towers:
            if third_embeddings is None:
                raise ValueError("a 3T model needs third_embeddings (the third tower's output)")
            out.update(self.three_towers_features(out["image_features"], out["text_features"], third_embeddings))
            out["logit_scale_3t"] = self.logit_scale_3t.exp().clamp(max=self.max_logit_scale)
        elif third_embeddings is not None:
            raise ValueError("third_embeddings given to a model without a third tower")
        return out

    def three_towers_features(
        self,
        image_features: torch.Tensor | None,
        text_features: torch.Tensor | None,
        third_embeddings: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The 3T heads' unit-norm outputs for whichever inputs are given (None skips them):
        ``image_features_3t`` = f_h(f(x)) and ``text_features_3t`` = g_h(g(t)) from the unit-norm
        embeddings, ``third_image_features`` = h_f(h(x)) and ``third_text_features`` = h_g(h(x))
        from the third tower's output. Evaluation of the alpha mixture calls it piecewise."""
        if not self.three_towers:
            raise ValueError("this model has no Three Towers heads (setting is not 3T)")
        out = {}
        if image_features is not None:
            out["image_features_3t"] = F.normalize(self.image_proj_3t(image_features), dim=-1)
        if text_features is not None:
            out["text_features_3t"] = F.normalize(self.text_proj_3t(text_features), dim=-1)
        if third_embeddings is not None:
            third = third_embeddings.to(self.third_proj_image.weight.dtype)
            out["third_image_features"] = F.normalize(self.third_proj_image(third), dim=-1)
            out["third_text_features"] = F.normalize(self.third_proj_text(third), dim=-1)
        return out

    def set_grad_checkpointing(self, image: bool = True, text: bool = True) -> None:
        """Turn activation checkpointing of each tower (those inside the model) on or off."""
        if self.image_tower is not None:
            self.image_tower.set_grad_checkpointing(image)
        if self.text_tower is not None:
            self.text_tower.set_grad_checkpointing(text)


def _head(width: int, embed_dim: int) -> nn.Linear:
    head = nn.Linear(width, embed_dim, bias=False)
    # CLIP's initialisation, as for the two main heads.
    nn.init.normal_(head.weight, std=width**-0.5)
    return head


def build_clip(
    cfg: ModelConfig,
    vocab_size: int | None = None,
    logit_bias: float | None = None,
    without: tuple[str, ...] = (),
) -> CLIPModel:
    """The CLIPModel described by ``cfg``: towers from scratch (u) or loaded from local files
    (L, U; see ``pretrained.py``), and under 3T the Three Towers heads. Nothing is locked
    here: apply ``settings.trainable_rules`` and ``locked.split_locked`` afterwards.
    ``logit_bias`` (SigLIP's initial bias, -10 in the paper) adds the learnable ``logit_bias``.

    ``vocab_size`` is the tokenizer's size. ``cfg.vocab_size`` > 0 takes precedence but must not
    be smaller (token ids past the table would index out of range); with neither, the text
    tower's default (30522, the uncased BERT vocabulary) is used. A pretrained text tower keeps
    its checkpoint's table, which must hold the tokenizer's ids.

    ``without=("image",)`` leaves the (pretrained) image tower out: ``model.image_tower`` is None
    and nothing is loaded, for a locked tower whose embeddings come precomputed. Pretrained
    towers are built under their own RNG fork, so whether one is built or left out does not
    change the initialisation of anything else.
    """
    from .pretrained import load_image_tower, load_text_tower

    if cfg.vocab_size > 0:
        if vocab_size is not None and cfg.vocab_size < vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({vocab_size}); token ids would index past the embedding table"
            )
        vocab_size = cfg.vocab_size
    parsed = cfg.parsed
    if "image" in without:
        if not parsed.image.is_pretrained:
            raise ValueError(f"only a pretrained image tower can be left out, not one of setting {cfg.setting!r}")
        with torch.device("meta"):  # only its width is needed; no weights are made or loaded
            image_tower = build_image_tower(cfg.image.tower, parsed.image.image_size)
    elif parsed.image.is_pretrained:
        with torch.random.fork_rng(devices=[]):
            image_tower = load_image_tower(cfg.image.tower, cfg.image.pretrained, parsed.image.image_size)
    else:
        image_tower = build_image_tower(cfg.image.tower, parsed.image.image_size)
    if parsed.text.is_pretrained:
        with torch.random.fork_rng(devices=[]):
            text_tower = load_text_tower(cfg.text.tower, cfg.text.pretrained, cfg.text.pooling)
        rows = text_tower.vocab_rows
        if vocab_size is not None and vocab_size > rows:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens but the pretrained text "
                f"tower {text_tower.source} has {rows} embedding rows"
            )
    else:
        text_tower = build_text_tower(cfg.text.tower, vocab_size, pooling=cfg.text.pooling)
    third_width = image_tower_spec(cfg.third.tower or cfg.image.tower).width
    model = CLIPModel(
        image_tower=image_tower,
        text_tower=text_tower,
        embed_dim=cfg.embed_dim,
        init_logit_scale=cfg.init_logit_scale,
        max_logit_scale=cfg.max_logit_scale,
        third_width=third_width if parsed.three_towers else 0,
        init_logit_scale_3t=cfg.init_logit_scale_3t or None,
        logit_bias=logit_bias,
    )
    if not cfg.locked_head_trainable:
        # A frozen head must not scramble the locked features: validation made it square.
        for tower in parsed.main_towers:
            if tower.locked:
                nn.init.eye_(getattr(model, f"{tower.role}_proj").weight)
    model.set_grad_checkpointing(parsed.image.grad_checkpointing, parsed.text.grad_checkpointing)
    if "image" in without:
        model.image_tower = None
    return model
