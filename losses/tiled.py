"""Tiled contrastive losses in PyTorch: exact, and never more than one logits tile in memory.

Forward streams over [tile, tile] blocks of S = s * X Y^T (X: this rank's image rows, Y: all
ranks' text columns) keeping only log-sum-exp vectors; backward recomputes each block from the
saved features and LSEs. Extra memory is O(tile^2 + B*D) (the gradient buffers), instead of the
O(b*B) logits of ``naive``. Same conventions as ``naive.py``: the functions return this rank's
share and the column gradient for *all* columns, which ``gather_with_grad``'s backward sums back
to the owners. Arithmetic is float32 (float64 for float64 inputs), whatever the feature dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .naive import accumulation_dtype

LseCombine = Callable[[Tensor], Tensor]


def tile_bounds(n: int, tile: int) -> list[tuple[int, int]]:
    """[start, end) of each tile along an axis of length n; the last one may be short."""
    return [(start, min(start + tile, n)) for start in range(0, n, tile)]


def softmax_lse(
    image: Tensor, text_all: Tensor, scale: Tensor, row_offset: int, tile: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column log-sum-exp of S = scale * image @ text_all^T, streamed over tiles,
    and the positive logits S[i, row_offset + i]. Returns ([b], [B], [b]) in ``scale.dtype``.

    Two log-sum-exps per tile (not one exp shared by rows and columns) because a shared
    shift would underflow rows that sit far below the tile's max.
    """
    acc, device = scale.dtype, image.device
    row_lse = torch.empty(image.shape[0], dtype=acc, device=device)
    positives = torch.empty(image.shape[0], dtype=acc, device=device)
    col_lse = torch.full((text_all.shape[0],), float("-inf"), dtype=acc, device=device)
    for r0, r1 in tile_bounds(image.shape[0], tile):
        # Blocks are scaled and cast one at a time: memory stays O(tile * D), never O(B * D).
        rows = scale * image[r0:r1].to(acc)  # [tr, D]
        positives[r0:r1] = (rows * text_all[row_offset + r0 : row_offset + r1].to(acc)).sum(1)
        running = torch.full((r1 - r0,), float("-inf"), dtype=acc, device=device)
        for c0, c1 in tile_bounds(text_all.shape[0], tile):
            logits = rows @ text_all[c0:c1].to(acc).T  # [tr, tc]
            running = torch.logaddexp(running, torch.logsumexp(logits, dim=1))
            col_lse[c0:c1] = torch.logaddexp(col_lse[c0:c1], torch.logsumexp(logits, dim=0))
        row_lse[r0:r1] = running
    return row_lse, col_lse, positives


TileGrad = Callable[[Tensor, int, int, int, int], Tensor]


def backward_products(
    image: Tensor,
    text_all: Tensor,
    scale: Tensor,
    tile: int,
    tile_grad: TileGrad,
    want_image: bool,
    want_text: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Stream over tiles of S = scale * X Y^T and accumulate the products the gradients need.

    ``tile_grad(logits, r0, r1, c0, c1)`` turns a logits tile into H = dLoss/dS for it (up
    to a scalar), in place if it likes. Returns ``(H @ Y or None, H^T @ X or None,
    sum_ij H_ij x_i.y_j)`` in ``scale.dtype``. A product is skipped when its side needs no
    gradient (LiT: the locked image tower's features carry none), saving a quarter of the
    matmuls; the last sum is read off whichever product exists, never from an extra pass.
    """
    acc, device = scale.dtype, image.device
    want_h_y = want_image or not want_text  # H Y also yields the scale gradient
    h_y = torch.zeros(image.shape, dtype=acc, device=device) if want_h_y else None
    h_x = torch.zeros(text_all.shape, dtype=acc, device=device) if want_text else None
    hxy = torch.zeros((), dtype=acc, device=device)
    for r0, r1 in tile_bounds(image.shape[0], tile):
        image_block = image[r0:r1].to(acc)
        rows = scale * image_block  # [tr, D], scaled once per row block
        for c0, c1 in tile_bounds(text_all.shape[0], tile):
            cols = text_all[c0:c1].to(acc)
            h = tile_grad(rows @ cols.T, r0, r1, c0, c1)  # [tr, tc]
            if h_y is not None:
                h_y[r0:r1].addmm_(h, cols)
            if h_x is not None:
                h_x[c0:c1].addmm_(h.T, image_block)
        if h_y is not None:  # sum_ij H_ij x_i.y_j = sum_i x_i.(H Y)_i
            hxy += torch.dot(image_block.reshape(-1), h_y[r0:r1].reshape(-1))
    if h_y is None:  # = sum_j y_j.(H^T X)_j, one column block at a time
        for c0, c1 in tile_bounds(text_all.shape[0], tile):
            hxy += torch.dot(text_all[c0:c1].to(acc).reshape(-1), h_x[c0:c1].reshape(-1))
    return h_y, h_x, hxy


def _to(grad: Tensor | None, like: Tensor) -> Tensor | None:
    return None if grad is None else grad.to(like.dtype).reshape(like.shape)


class _TiledSoftmax(torch.autograd.Function):
    """Symmetric InfoNCE share of one rank; gradients follow the W x global convention."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        image: Tensor,
        text_all: Tensor,
        logit_scale: Tensor,
        row_offset: int,
        tile: int,
        combine: LseCombine | None,
    ) -> Tensor:  # type: ignore[override]
        scale = logit_scale.detach().reshape(()).to(accumulation_dtype(image))
        row_lse, col_lse, positives = softmax_lse(image, text_all, scale, row_offset, tile)
        if combine is not None:
            # Columns hold every rank's texts; their softmax runs over every rank's images.
            col_lse = combine(col_lse)
        b = image.shape[0]
        ctx.save_for_backward(image, text_all, logit_scale, row_lse, col_lse)
        ctx.row_offset, ctx.tile = row_offset, tile
        # Rank's share: its image->text rows plus the text->image rows of its own texts.
        own_cols = col_lse[row_offset : row_offset + b]
        return 0.5 * (row_lse + own_cols - 2.0 * positives).sum() / b

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        image, text_all, logit_scale, row_lse, col_lse = ctx.saved_tensors
        acc = row_lse.dtype
        scale = logit_scale.detach().reshape(()).to(acc)
        offset = ctx.row_offset

        def tile_grad(logits: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
            # H = P_row + P_col - 2 * positives; scalar factors are applied at the end.
            h = torch.exp(logits - row_lse[r0:r1, None])
            h += logits.sub_(col_lse[None, c0:c1]).exp_()  # in place: 2 tile buffers, not 5
            h.diagonal(offset + r0 - c0).sub_(2.0)  # positives: offset + r0 + i == c0 + j
            return h

        h_y, h_x, hxy = backward_products(
            image, text_all, scale, ctx.tile, tile_grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        # dL/dS = 0.5/B * H; times W (the convention) gives 0.5/b. S = s X Y^T, so
        # dX = s H Y, dY = s H^T X, ds = sum H_ij x_i.y_j; scaled in place (no extra [B, D]).
        coef = grad_out.to(acc) * 0.5 / image.shape[0]
        return (
            _to(h_y.mul_(coef * scale) if ctx.needs_input_grad[0] else None, image),
            _to(h_x.mul_(coef * scale) if h_x is not None else None, text_all),
            _to(coef * hxy, logit_scale),
            None,
            None,
            None,
        )


def softmax_tiled(
    image: Tensor,
    text_all: Tensor,
    logit_scale: Tensor,
    row_offset: int,
    tile_size: int,
    combine: LseCombine | None = None,
) -> Tensor:
    """Tiled ``naive.softmax_rows``: this rank's image rows against ``text_all`` columns.

    ``combine`` merges the column LSEs of all ranks (``logsumexp_across_ranks``) or is None
    for one process / ``scope="local"``.
    """
    return _TiledSoftmax.apply(image, text_all, logit_scale, row_offset, tile_size, combine)


class _TiledSigmoid(torch.autograd.Function):
    """SigLIP share of one rank, -(1/b) sum over its rows and all columns; no LSE needed."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        image: Tensor,
        text_all: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor,
        row_offset: int,
        tile: int,
    ) -> Tensor:  # type: ignore[override]
        acc = accumulation_dtype(image)
        scale = logit_scale.detach().reshape(()).to(acc)
        bias = logit_bias.detach().reshape(()).to(acc)
        total = torch.zeros((), dtype=acc, device=image.device)
        for r0, r1 in tile_bounds(image.shape[0], tile):
            rows = scale * image[r0:r1].to(acc)
            for c0, c1 in tile_bounds(text_all.shape[0], tile):
                # margins = z * logits: z = -1 everywhere, then +1 on the positives.
                margins = torch.addmm(bias, rows, text_all[c0:c1].to(acc).T).neg_()
                margins.diagonal(row_offset + r0 - c0).neg_()
                total += F.softplus(margins.neg_()).sum()  # -log sigmoid(m) = softplus(-m)
        ctx.save_for_backward(image, text_all, logit_scale, logit_bias)
        ctx.row_offset, ctx.tile = row_offset, tile
        return total / image.shape[0]

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        image, text_all, logit_scale, logit_bias = ctx.saved_tensors
        acc = accumulation_dtype(image)
        scale = logit_scale.detach().reshape(()).to(acc)
        bias = logit_bias.detach().reshape(()).to(acc)
        h_sum = torch.zeros((), dtype=acc, device=image.device)

        def tile_grad(logits: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
            nonlocal h_sum
            # d softplus(-z l)/dl = -z sigmoid(-z l): sigmoid(l) where z=-1, and
            # -sigmoid(-l) = sigmoid(l) - 1 on the positives (z=+1).
            h = logits.add_(bias).sigmoid_()
            h.diagonal(ctx.row_offset + r0 - c0).sub_(1.0)
            h_sum += h.sum()  # d/d bias
            return h

        h_y, h_x, hxy = backward_products(
            image, text_all, scale, ctx.tile, tile_grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        coef = grad_out.to(acc) / image.shape[0]  # 1/B per pair, times W (the convention)
        return (
            _to(h_y.mul_(coef * scale) if ctx.needs_input_grad[0] else None, image),
            _to(h_x.mul_(coef * scale) if h_x is not None else None, text_all),
            _to(coef * hxy, logit_scale),
            _to(coef * h_sum, logit_bias),
            None,
            None,
        )


def sigmoid_tiled(
    image: Tensor, text_all: Tensor, logit_scale: Tensor, logit_bias: Tensor, row_offset: int, tile_size: int
) -> Tensor:
    """Tiled ``naive.sigmoid_rows`` (same value and gradients, O(tile^2) logits memory)."""
    return _TiledSigmoid.apply(image, text_all, logit_scale, logit_bias, row_offset, tile_size)
