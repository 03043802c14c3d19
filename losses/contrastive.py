"""Public contrastive losses: CLIP's softmax InfoNCE and SigLIP's sigmoid loss.

One calling convention for every implementation (``naive``, ``tiled``, ``triton``):
features are the caller's L2-normalised [b, D] local features, ``logit_scale`` is the
multiplier itself (already exponentiated, shape [1] or []), and under torch.distributed with
``scope="global"`` negatives come from every rank. Value and gradient conventions across
ranks are in ``distributed.py`` and ``docs/loss.md``: the value is the global-batch loss on
every rank, local feature gradients are W x the global ones, so a data-parallel engine that
averages gradients (DeepSpeed) applies exactly the global-batch gradient.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor

from . import naive
from .config import LossConfig
from .distributed import (
    ProcessGroup,
    average_value,
    count_nonfinite,
    gather_with_grad,
    logsumexp_across_ranks,
    rank_and_world,
)


class NonFiniteInputError(ValueError):
    """The loss got NaN/Inf features; raised on every rank together (counts are all-reduced)."""


def check_finite(named: dict[str, Tensor], group: ProcessGroup | None = None) -> None:
    """Raise ``NonFiniteInputError`` naming each input that holds NaN/Inf and how many (all ranks)."""
    counts = count_nonfinite(list(named.values()), group)
    _, world = rank_and_world(group)
    per = " per rank" if world > 1 else ""
    bad = [
        f"{name}: {n} non-finite value(s) (NaN/Inf) of {named[name].numel()}{per}"
        for name, n in zip(named, counts, strict=True)
        if n
    ]
    if bad:
        where = f" (counted over {world} ranks)" if world > 1 else ""
        raise NonFiniteInputError("contrastive loss got non-finite inputs" + where + ": " + "; ".join(bad))


def _check_shapes(image_features: Tensor, text_features: Tensor) -> None:
    """Both towers must give [b, D] with the same b and D (b equal on all ranks, unchecked)."""
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"expected image_features and text_features of one shape [b, D], got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def _columns(local: Tensor, gathered: Tensor | None, cross_rank: bool, group: ProcessGroup | None) -> Tensor:
    """All ranks' features for the column side: given pre-gathered, gathered here, or local."""
    if not cross_rank:
        return local
    return gathered if gathered is not None else gather_with_grad(local, group)


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    impl: str = "naive",
    *,
    scope: str = "global",
    group: ProcessGroup | None = None,
    tile_size: int = 1024,
    check_inputs: bool = True,
    image_features_all: Tensor | None = None,
    text_features_all: Tensor | None = None,
) -> Tensor:
    """Mean symmetric InfoNCE 0.5 * (CE(s I T^T, arange) + CE(s T I^T, arange)), a scalar.

    Args:
        image_features, text_features: [b, D] local features, already L2-normalised.
        logit_scale: the multiplier s (exponentiated), shape [1] or [].
        impl: ``naive`` | ``tiled`` | ``triton``; all give the same value and gradients.
        scope: ``global`` (negatives from all ranks of ``group``) or ``local``.
        group: process group; ``None`` is the default group when torch.distributed is up.
        tile_size: tile edge of ``tiled``.
        check_inputs: raise ``ValueError`` on NaN/Inf inputs (one host sync).
        image_features_all, text_features_all: the output of ``gather_with_grad`` for these
            features, if the caller already gathered them (to share one gather between the
            loss terms of Three Towers). ``naive`` uses both, ``tiled``/``triton`` only text.

    Returns the global-batch loss (same on every rank); local gradients are W x global, see
    the module docstring. Every rank must pass the same b.
    """
    LossConfig(kind="softmax", impl=impl, scope=scope, tile_size=tile_size)  # validates
    _check_shapes(image_features, text_features)
    if check_inputs:
        check_finite(
            {"image_features": image_features, "text_features": text_features, "logit_scale": logit_scale}, group
        )
    rank, world = rank_and_world(group)
    cross_rank = scope == "global" and world > 1
    row_offset = rank * image_features.shape[0] if cross_rank else 0
    text_all = _columns(text_features, text_features_all, cross_rank, group)
    if impl == "naive":
        image_all = _columns(image_features, image_features_all, cross_rank, group)
        local = naive.softmax_rows(image_features, text_features, image_all, text_all, logit_scale, row_offset)
    else:
        # Tiled kernels need only the text columns: the text->image direction is the column
        # log-sum-exp of the same logits, combined over ranks instead of recomputed.
        combine = partial(logsumexp_across_ranks, group=group) if cross_rank else None
        if impl == "tiled":
            from .tiled import softmax_tiled as tiled_fn
        else:
            from .triton_kernels import softmax_triton as tiled_fn
        local = tiled_fn(image_features, text_all, logit_scale, row_offset, tile_size, combine)
    return average_value(local, group)


def sigmoid_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    impl: str = "naive",
    *,
    scope: str = "global",
    group: ProcessGroup | None = None,
    tile_size: int = 1024,
    check_inputs: bool = True,
    text_features_all: Tensor | None = None,
) -> Tensor:
    """SigLIP loss -(1/B) * sum_ij log sigmoid(z_ij * (s * x_i.y_j + bias)), z=+1 on positives.

    Same arguments and cross-rank conventions as ``clip_loss``; ``logit_bias`` is the learnable
    bias (shape [1] or []). B is the global batch for ``scope="global"``, b for ``local``.
    ``impl`` is ``naive`` or ``tiled``.
    """
    LossConfig(kind="sigmoid", impl=impl, scope=scope, tile_size=tile_size)  # validates
    _check_shapes(image_features, text_features)
    if check_inputs:
        check_finite(
            {
                "image_features": image_features,
                "text_features": text_features,
                "logit_scale": logit_scale,
                "logit_bias": logit_bias,
            },
            group,
        )
    rank, world = rank_and_world(group)
    cross_rank = scope == "global" and world > 1
    row_offset = rank * image_features.shape[0] if cross_rank else 0
    text_all = _columns(text_features, text_features_all, cross_rank, group)
    if impl == "naive":
        local = naive.sigmoid_rows(image_features, text_all, logit_scale, logit_bias, row_offset)
    else:
        from .tiled import sigmoid_tiled

        local = sigmoid_tiled(image_features, text_all, logit_scale, logit_bias, row_offset, tile_size)
    return average_value(local, group)
