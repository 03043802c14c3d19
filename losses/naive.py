"""Reference (naive) contrastive losses: they materialise this rank's [b, W*b] logits.

These are the plain formulas every other implementation must match. Each function computes
one rank's share (its own rows against all gathered columns, as open_clip's
``local_loss=True, gather_with_grad=True``); the caller gathers the features and averages the
value over ranks (``contrastive.py``). With one process the share is the whole loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def accumulation_dtype(features: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) is computed in float32."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def softmax_rows(
    image_local: Tensor,
    text_local: Tensor,
    image_all: Tensor,
    text_all: Tensor,
    logit_scale: Tensor,
    row_offset: int,
) -> Tensor:
    """This rank's symmetric InfoNCE: 0.5 * (CE(image->all texts) + CE(text->all images)).

    Written as log-sum-exp minus the positive logit (the same value as ``F.cross_entropy``
    with labels ``row_offset + arange(b)``) because it keeps fewer B x B buffers alive:
    cross_entropy saves its own log-softmax matrix per direction.
    ``row_offset`` is the global index of this rank's first row, where its positives sit
    among the gathered columns.
    """
    acc = accumulation_dtype(image_local)
    scale = logit_scale.reshape(()).to(acc)
    # Upcast before the matmul: bf16 logits times a scale of ~100 would be off by ~0.4.
    # The scale multiplies the [b, D] rows, not the [b, B] product, so autograd keeps one
    # B-wide matrix instead of two (scale * M would save M for d/d scale).
    scaled_image = scale * image_local.to(acc)  # [b, D]
    logits_image = scaled_image @ text_all.to(acc).T  # [b, B]
    if image_all is image_local and text_all is text_local:
        # One process or scope="local": text->image is the same matrix read by columns.
        lse_text = torch.logsumexp(logits_image, dim=0)  # [B]
    else:
        logits_text = (scale * text_local.to(acc)) @ image_all.to(acc).T  # [b, B]
        lse_text = torch.logsumexp(logits_text, dim=1)  # [b]
    lse_image = torch.logsumexp(logits_image, dim=1)  # [b]
    # Positive pairs (column row_offset + i) have the same logit in both directions; a row
    # dot product, since the backward of .diagonal() would allocate another [b, B] matrix.
    b = image_local.shape[0]
    positives = (scaled_image * text_all[row_offset : row_offset + b].to(acc)).sum(dim=1)  # [b]
    return 0.5 * (lse_image.mean() + lse_text.mean()) - positives.mean()


def sigmoid_rows(
    image_local: Tensor,
    text_all: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    row_offset: int,
) -> Tensor:
    """This rank's SigLIP share: -(1/b) * sum over its rows i and all columns j of
    log sigmoid(z_ij * (s * x_i.y_j + bias)), z = +1 for the positive pair, -1 otherwise.

    Dividing by the local b (not the global B) makes the mean over ranks equal the global
    loss -(1/B) * sum_ij, and makes the gradient W times the global one, as for softmax.
    """
    acc = accumulation_dtype(image_local)
    scale = logit_scale.reshape(()).to(acc)
    bias = logit_bias.reshape(()).to(acc)
    logits = scale * (image_local.to(acc) @ text_all.to(acc).T) + bias  # [b, B]
    signs = -torch.ones_like(logits)
    signs.diagonal(row_offset).fill_(1.0)  # positives: global row (offset + i) == column
    return -F.logsigmoid(signs * logits).sum() / image_local.shape[0]
