"""The Three Towers (3T) loss: three symmetric contrastive terms sharing one cross-rank gather.

In the paper's notation (Kossen et al. 2023; docs/towers.md), with f(x), g(t) the unit-norm
image and text embeddings, h(x) the frozen third tower's output and f_h, g_h, h_f, h_g the four
linear heads (outputs L2-normalised)::

    L = (1/3) * [ w_fg * L(f(x),      g(t);      s_fg)
                + w_fh * L(f_h(f(x)), h_f(h(x)); s_fh)
                + w_gh * L(g_h(g(t)), h_g(h(x)); s_gh) ]

where L(a, b; s) is CLIP's symmetric InfoNCE over the global batch (``clip_loss``: the mean of
the a->b and b->a cross-entropies of the logits s * a b^T), s = exp(t) clamped, one learnable
temperature per term, and the weights are ``loss.weight_main``, ``loss.weight_image_third``,
``loss.weight_text_third`` (default 1, 1, 1: the paper's plain mean of the three losses).

Every term runs through ``clip_loss`` with the configured ``impl`` (naive/tiled/triton) and
``scope`` (global/local), so values and gradients follow its cross-rank convention. Under
``scope="global"`` with several ranks, the column-side features of the three terms (g, h_f, h_g;
naive also needs the row side f, f_h, g_h) are concatenated along the feature axis and gathered
with ONE ``gather_with_grad`` (one all-gather forward, one reduce-scatter backward), and each
term gets its slice. NaN/Inf inputs are counted once for all eight inputs (one tiny all-reduce)
and raise ``NonFiniteInputError`` on every rank together.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .config import LossConfig
from .contrastive import check_finite, clip_loss
from .distributed import ProcessGroup, gather_with_grad, rank_and_world

TERMS = ("main", "image_third", "text_third")
"""Names of the three terms, in the order of ``LossConfig.three_towers_weights``."""
INPUT_KEYS = (
    "image_features",
    "text_features",
    "logit_scale",
    "image_features_3t",
    "text_features_3t",
    "third_image_features",
    "third_text_features",
    "logit_scale_3t",
)
"""The keys of the model's forward dict the loss reads (``CLIPModel.forward`` under 3T)."""


def three_towers_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    image_features_3t: Tensor,
    text_features_3t: Tensor,
    third_image_features: Tensor,
    third_text_features: Tensor,
    logit_scale_3t: Tensor,
    *,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    impl: str = "naive",
    scope: str = "global",
    group: ProcessGroup | None = None,
    tile_size: int = 1024,
    check_inputs: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(total loss, {"main", "image_third", "text_third": detached term values}).

    Args:
        image_features, text_features: f(x), g(t), [b, D] local, unit-norm.
        logit_scale: s_fg, the image-text multiplier (exponentiated), shape [1] or [].
        image_features_3t, text_features_3t: f_h(f(x)), g_h(g(t)), [b, D], unit-norm.
        third_image_features, third_text_features: h_f(h(x)), h_g(h(x)), [b, D], unit-norm.
        logit_scale_3t: [s_fh, s_gh], shape [2] (exponentiated).
        weights: (w_fg, w_fh, w_gh), each >= 0.
        impl, scope, group, tile_size, check_inputs: as for ``clip_loss``.

    Features of different float dtypes are promoted to a common one (they are concatenated for
    the shared gather). Returns the global-batch value (same on every rank); local gradients are
    W x global, as for ``clip_loss``.
    """
    w_fg, w_fh, w_gh = weights
    LossConfig(
        kind="softmax",
        impl=impl,
        scope=scope,
        tile_size=tile_size,
        weight_main=w_fg,
        weight_image_third=w_fh,
        weight_text_third=w_gh,
    )  # validates
    named = {
        "image_features": image_features,
        "text_features": text_features,
        "logit_scale": logit_scale,
        "image_features_3t": image_features_3t,
        "text_features_3t": text_features_3t,
        "third_image_features": third_image_features,
        "third_text_features": third_text_features,
        "logit_scale_3t": logit_scale_3t,
    }
    if logit_scale_3t.numel() != 2:
        raise ValueError(
            f"logit_scale_3t must hold 2 values (f_h-h_f, g_h-h_g), got shape {tuple(logit_scale_3t.shape)}"
        )
    if check_inputs:
        check_finite(named, group)  # one count for all eight inputs, all ranks raise together
    features = [
        image_features,
        image_features_3t,
        text_features_3t,
        text_features,
        third_image_features,
        third_text_features,
    ]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in features])
    rows = [t.to(dtype) for t in features[:3]]  # f, f_h, g_h: this rank's rows
    cols = [t.to(dtype) for t in features[3:]]  # g, h_f, h_g: the columns (negatives)
    for row, col, term in zip(rows, cols, TERMS, strict=True):
        if row.ndim != 2 or row.shape != col.shape or row.shape[0] != rows[0].shape[0]:
            raise ValueError(
                f"3T term {term!r}: expected two [b, D] features with the b of the "
                f"others, got {tuple(row.shape)} and {tuple(col.shape)}"
            )

    _, world = rank_and_world(group)
    rows_all: list[Tensor | None] = [None, None, None]
    cols_all: list[Tensor | None] = [None, None, None]
    if scope == "global" and world > 1:
        # One gather for all three terms: [b, sum D] -> [W*b, sum D], sliced per term. The
        # tiled kernels need only the columns; naive also reads the gathered rows.
        sides = cols + rows if impl == "naive" else cols
        gathered = gather_with_grad(torch.cat(sides, dim=1), group)
        parts = gathered.split([t.shape[1] for t in sides], dim=1)
        cols_all = list(parts[:3])
        if impl == "naive":
            rows_all = list(parts[3:])

    scales = [logit_scale, logit_scale_3t.reshape(2)[0:1], logit_scale_3t.reshape(2)[1:2]]
    values = [
        clip_loss(
            row,
            col,
            scale,
            impl,
            scope=scope,
            group=group,
            tile_size=tile_size,
            check_inputs=False,
            image_features_all=row_all,
            text_features_all=col_all,
        )
        for row, col, scale, row_all, col_all in zip(rows, cols, scales, rows_all, cols_all, strict=True)
    ]
    total = sum(weight * value for weight, value in zip(weights, values, strict=True)) / 3
    return total, {term: value.detach() for term, value in zip(TERMS, values, strict=True)}
