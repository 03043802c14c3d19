"""Three Towers at inference: the alpha mixture of the main towers and the third tower, as a model.

For alpha in [0, 1] the 3T paper's convex combination scores an image x against a text t as

    score_alpha(x, t) = alpha * <f(x), g(t)> + (1 - alpha) * <h_g(h(x)), g_h(g(t))>

(unit-norm embeddings; alpha = 1 is the plain 3T model, which costs what CLIP costs; alpha = 0
reads the frozen third tower through its text-side head, LiT-like). It is one pair of towers
whose dot product is exactly that score: the image side is [sqrt(alpha) f(x), sqrt(1-alpha)
h_g(h(x))] and the text side [sqrt(alpha) g(t), sqrt(1-alpha) g_h(g(t))], both unit-norm
(2 * embed_dim wide). ``ThreeTowersMixture`` is that pair behind the usual ``encode_image`` /
``encode_text``, so ``evaluate`` and the export's inference model use it unchanged;
``tritower.evaluation.evaluate_alphas`` encodes the pieces once and reports every metric for
several alphas.

Zero-shot class embeddings are formed from the concatenated text embeddings as for any model
(normalised mean over the prompts), so the numbers are those of the exported mixed model.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, or ValueError unless 0 <= alpha <= 1."""
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"the 3T mixing weight alpha must be in [0, 1], got {alpha}")
    return alpha


def mix_embeddings(main: torch.Tensor, third: torch.Tensor, alpha: float) -> torch.Tensor:
    """[sqrt(alpha) * main, sqrt(1 - alpha) * third] along the feature axis: [N, D1 + D2].

    Two pairs mixed this way have dot product alpha * <main, main'> + (1 - alpha) * <third,
    third'>; with unit-norm parts the result is unit-norm too.
    """
    alpha = check_alpha(alpha)
    third = third.to(main.dtype)
    return torch.cat([math.sqrt(alpha) * main, math.sqrt(1.0 - alpha) * third], dim=-1)


def three_towers_model(model: nn.Module) -> nn.Module:
    """The 3T ``CLIPModel`` inside ``model`` (itself, a ``CLIPWithLocked``'s ``.model`` or an
    engine's ``.module``): the one holding the 3T heads."""
    for candidate in (model, getattr(model, "model", None), getattr(model, "module", None)):
        if candidate is not None and getattr(candidate, "three_towers", False):
            return candidate
    raise ValueError(
        "alpha mixing needs a 3T model (a CLIPModel built with setting '3T', or a "
        f"CLIPWithLocked around one); got {type(model).__name__}"
    )


class ThreeTowersMixture(nn.Module):
    """A 3T model and its third tower as one pair of towers scoring ``score_alpha``.

    ``model`` encodes the main towers (a 3T ``CLIPModel`` or ``CLIPWithLocked``), ``third_tower``
    is h (a ``LockedTower``: ``encode(images)`` gives h(x)). ``encode_image`` and
    ``encode_text`` return unit-norm [N, 2 * embed_dim] features (module docstring).
    """

    def __init__(self, model: nn.Module, third_tower: nn.Module, alpha: float) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        three_towers_model(model)  # fails early on a model without 3T heads
        self.model = model
        self.third_tower = third_tower
        # Mirror the wrapped model's mode: ``evaluate`` restores the wrapper's mode afterwards,
        # and a fresh module would otherwise leave an eval-mode model in training mode.
        self.train(model.training)

    def _heads(self, **inputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
        clip = three_towers_model(self.model)
        return clip.three_towers_features(inputs.get("image"), inputs.get("text"), inputs.get("third"))

    def image_parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x), h_g(h(x))), each unit-norm [N, embed_dim]."""
        third = getattr(self.third_tower, "encode", self.third_tower)(images)
        return self.model.encode_image(images), self._heads(third=third)["third_text_features"]

    def text_parts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g(t), g_h(g(t))), each unit-norm [N, embed_dim]."""
        text = self.model.encode_text(input_ids, attention_mask)
        return text, self._heads(text=text)["text_features_3t"]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [N,3,H,W] -> [sqrt(alpha) f(x), sqrt(1-alpha) h_g(h(x))], [N, 2D] unit-norm."""
        return mix_embeddings(*self.image_parts(images), self.alpha)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [N,L] -> [sqrt(alpha) g(t), sqrt(1-alpha) g_h(g(t))]."""
        return mix_embeddings(*self.text_parts(input_ids, attention_mask), self.alpha)

    def scale(self) -> torch.Tensor:
        """The image-text term's learnt multiplier exp(t_fg) (clamped), shape [1]: what
        ``similarity(scaled=True)`` multiplies ``score_alpha`` by."""
        return three_towers_model(self.model).scale()
