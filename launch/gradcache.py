"""Exact large-batch accumulation for contrastive losses (GradCache, Gao et al. 2021).

Plain gradient accumulation computes the loss per micro-batch and so loses every negative outside
it. GradCache keeps them all at the activation memory of one micro-batch:

1. encode every micro-batch without autograd, remembering the RNG state before each;
2. compute the loss over the whole global batch from those features (the loss gathers across
   ranks as usual) and back-propagate only into the features: d loss / d features;
3. re-encode each micro-batch with autograd, RNG replayed so dropout and drop-path draw the same
   masks, and back-propagate the cached feature gradients through the towers.

The towers' gradients equal those of one big step. Through DeepSpeed, the engine runs with
``gradient_accumulation_steps = M`` so it reduces gradients once per step, at the last
micro-batch, and ``backward(..., scale_wrt_gas=False)`` because the cached gradients already are
the full-batch gradients (no 1/M).
"""

from __future__ import annotations

from typing import Callable

import torch

Batch = dict[str, torch.Tensor]


def split_batch(batch: Batch, micro_batches: int) -> list[Batch]:
    """Cut every tensor of a per-rank batch into ``micro_batches`` equal consecutive pieces."""
    size = batch["image"].shape[0]
    if size % micro_batches:
        raise ValueError(f"per-rank batch {size} is not divisible into {micro_batches} micro-batches")
    step = size // micro_batches
    return [
        {key: value[i * step : (i + 1) * step] for key, value in batch.items() if isinstance(value, torch.Tensor)}
        for i in range(micro_batches)
    ]


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def gradcache_backward(
    engine,
    micro_batches: list[Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    to_inputs: Callable[[Batch], tuple[torch.Tensor, ...]],
    device: torch.device,
) -> tuple[torch.Tensor, float]:
    """Forward and backward over all micro-batches; returns (global loss, logit scale).

    Every micro-batch but the last is closed with ``engine.step()`` (DeepSpeed only counts it);
    the caller's own ``engine.step()`` after this call is the real update, at the accumulation
    boundary. ``engine`` is a DeepSpeed engine (or anything with ``__call__``/``backward``/``step``)
    whose forward returns ``image_features``, ``text_features`` and ``logit_scale``. A non-finite
    loss returns before any backward: nothing is accumulated.
    """
    count = len(micro_batches)
    states, image_parts, text_parts = [], [], []
    with torch.no_grad():
        for micro in micro_batches:
            states.append(_rng_state(device))
            out = engine(*to_inputs(micro))
            image_parts.append(out["image_features"].float())
            text_parts.append(out["text_features"].float())
            scale = out["logit_scale"].float()
    after_encoding = _rng_state(device)

    image_features = torch.cat(image_parts).requires_grad_(True)  # [b_rank, D]
    text_features = torch.cat(text_parts).requires_grad_(True)  # [b_rank, D]
    scale_leaf = scale.detach().requires_grad_(True)  # [1]
    loss = loss_fn(image_features, text_features, scale_leaf)
    if not torch.isfinite(loss):
        return loss.detach(), scale.item()
    loss.backward()

    sizes = [part.shape[0] for part in image_parts]
    image_grads = image_features.grad.split(sizes)
    text_grads = text_features.grad.split(sizes)
    for index, micro in enumerate(micro_batches):
        _set_rng_state(states[index], device)
        out = engine(*to_inputs(micro))
        # A surrogate whose gradient w.r.t. the towers is exactly the cached feature gradient.
        # The temperature appears in every micro-batch's forward: each carries 1/M of its gradient.
        surrogate = (
            (out["image_features"].float() * image_grads[index]).sum()
            + (out["text_features"].float() * text_grads[index]).sum()
            + (out["logit_scale"].float() * scale_leaf.grad).sum() / count
        )
        engine.backward(surrogate, scale_wrt_gas=False)
        if index < count - 1:
            engine.step()
    _set_rng_state(after_encoding, device)
    return loss.detach(), scale.item()
