"""Configuration of the contrastive loss (the ``loss`` section)."""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("softmax", "sigmoid")
SIGLIP_INIT_BIAS = -10.0
"""SigLIP's initial logit bias b = -10 (Zhai et al., 2023), where the sigmoid loss starts."""
IMPLS = ("naive", "tiled", "triton")
SCOPES = ("global", "local")


@dataclass
class LossConfig:
    """Which contrastive loss is computed, and how. Validated on construction."""

    kind: str = "softmax"
    """``softmax`` (CLIP's symmetric InfoNCE) or ``sigmoid`` (SigLIP, needs a ``logit_bias``)."""
    impl: str = "naive"
    """``naive`` (materialises the b x B logits), ``tiled`` (PyTorch tiles, O(tile^2 + B) extra
    memory) or ``triton`` (fused Triton kernels for the tiles; softmax only, CUDA tensors or
    ``TRITON_INTERPRET=1``)."""
    scope: str = "global"
    """``global``: negatives from every rank; ``local``: each rank's own negatives only."""
    tile_size: int = 1024
    """Tile edge for the tiled implementations (rows and columns of one logits tile)."""
    check_finite: bool = True
    """Raise ``ValueError`` on NaN/Inf features. Costs one host sync (and, with several ranks,
    one tiny all-reduce) per call; turn off only once a run is known to be stable."""
    weight_main: float = 1.0
    """3T only: weight w_fg of the image-text term L(f, g) in
    L = (w_fg L(f,g) + w_fh L(f_h,h_f) + w_gh L(g_h,h_g)) / 3. >= 0."""
    weight_image_third: float = 1.0
    """3T only: weight w_fh of the image-tower-to-third-tower term L(f_h, h_f). >= 0."""
    weight_text_third: float = 1.0
    """3T only: weight w_gh of the text-tower-to-third-tower term L(g_h, h_g). >= 0."""

    def __post_init__(self) -> None:
        for name, allowed in (("kind", KINDS), ("impl", IMPLS), ("scope", SCOPES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"loss.{name}={value!r}; expected one of {allowed}")
        if self.kind == "sigmoid" and self.impl == "triton":
            raise ValueError("loss.impl='triton' implements kind='softmax' only; use 'tiled'")
        if not isinstance(self.tile_size, int) or self.tile_size < 1:
            raise ValueError(f"loss.tile_size={self.tile_size!r}; expected a positive int")
        for name in ("weight_main", "weight_image_third", "weight_text_third"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value >= 0):
                raise ValueError(f"loss.{name}={value!r}; expected a finite float >= 0")

    @property
    def three_towers_weights(self) -> tuple[float, float, float]:
        """(w_fg, w_fh, w_gh): the weights of the main, image-third and text-third terms."""
        return (float(self.weight_main), float(self.weight_image_third), float(self.weight_text_third))
