"""Exact large-batch accumulation for contrastive losses (GradCache, Gao et al. 2021).

Plain gradient accumulation computes the loss per micro-batch and so loses every negative outside
it. GradCache keeps them all at the activation memory of one micro-batch:

1. encode every micro-batch without autograd, remembering the RNG state before each;
2. compute the loss over the whole global batch from those features (the loss gathers across
   ranks as usual) and back-propagate only into the features: d loss / d features;
3. re-encode each micro-batch with autograd, RNG replayed so dropout and drop-path draw the same
   masks, and back-propagate the cached feature gradients through the towers.

The towers' gradients equal those of one big step. Through DeepSpeed, the engine runs with
``gradient_accumulation_steps = M`` and ``backward(..., scale_wrt_gas=False)`` because the cached
gradients already are the full-batch gradients (no 1/M). ZeRO-0 and ZeRO-1 then reduce once per
step, at the last micro-batch; ZeRO-2/3 reduce-scatter at every micro-batch's backward (M times
the gradient bytes), unless ``train.coalesce_grad_reduction`` makes ``build_engine`` set
``engine.coalesce_micro_batches``: then the backwards run inside DeepSpeed's
``engine.coalesce_grad_reduction()``, gradients stay on the rank and are reduced once when it
exits (docs/gpu.md has the measurement).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

Batch = dict[str, torch.Tensor]


def split_batch(batch: Batch, micro_batches: int) -> list[Batch]:
    """Cut every tensor of a per-rank batch into ``micro_batches`` equal consecutive pieces."""
    size = next(value.shape[0] for value in batch.values() if isinstance(value, torch.Tensor))
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
    engine: DeepSpeedEngine,
    micro_inputs: list[dict[str, torch.Tensor]],
    objective: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward and backward over all micro-batches; returns (the objective's result, detached:
    ``{"loss": global loss, terms...}``, and the detached outputs).

    ``micro_inputs`` are the keyword arguments of the engine's forward for each micro-batch,
    prepared once by the caller: a locked tower's embeddings in them are computed once and
    reused by both passes (a locked tower is never re-run). The engine's forward returns a dict
    of per-sample features ``[b, D]`` and temperatures/biases (keys starting with ``logit_``,
    one value per step); ``objective`` maps that dict (features concatenated over micro-batches)
    to ``{"loss": ..., terms}`` (``tritower.losses.objectives``). Features the loss does not use get no gradient.

    Every micro-batch but the last is closed with ``engine.step()`` (DeepSpeed only counts it;
    with coalesced reduction, where a step inside the block is illegal, these counting steps
    follow the block); the caller's own ``engine.step()`` after this call is the real update, at
    the accumulation boundary. A non-finite loss returns before any backward: nothing is
    accumulated.
    """
    count = len(micro_inputs)
    states, parts = [], []
    with torch.no_grad():
        for kwargs in micro_inputs:
            states.append(_rng_state(device))
            parts.append({key: value.float() for key, value in engine(**kwargs).items()})
    after_encoding = _rng_state(device)

    # Leaves the loss differentiates: features concatenated over micro-batches, scales of the
    # last micro-batch (the same parameter in each).
    leaves = {
        key: (parts[-1][key] if _is_scale(key) else torch.cat([p[key] for p in parts])).detach().requires_grad_(True)
        for key in parts[0]
    }
    result = objective(leaves)
    loss = result["loss"]
    detached = {key: value.detach() for key, value in result.items()}
    if not torch.isfinite(loss):
        return detached, {key: value.detach() for key, value in leaves.items()}
    loss.backward()

    sizes = [next(iter(v for k, v in p.items() if not _is_scale(k))).shape[0] for p in parts]
    grads = {
        key: (leaf.grad if _is_scale(key) else leaf.grad.split(sizes))
        for key, leaf in leaves.items()
        if leaf.grad is not None
    }
    coalesce = count > 1 and getattr(engine, "coalesce_micro_batches", False)
    with engine.coalesce_grad_reduction() if coalesce else contextlib.nullcontext():
        for index, kwargs in enumerate(micro_inputs):
            _set_rng_state(states[index], device)
            out = engine(**kwargs)
            # A surrogate whose gradient w.r.t. the towers is exactly the cached feature gradient.
            # A temperature appears in every micro-batch's forward: each carries 1/M of its gradient.
            surrogate = sum(
                (out[key].float() * grad).sum() / count if _is_scale(key) else (out[key].float() * grad[index]).sum()
                for key, grad in grads.items()
            )
            engine.backward(surrogate, scale_wrt_gas=False)
            if index < count - 1 and not coalesce:
                engine.step()
    if coalesce:
        # The block's exit reduced everything; these only advance DeepSpeed's micro-step count
        # so that the caller's step lands on the accumulation boundary.
        for _ in range(count - 1):
            engine.step()
    _set_rng_state(after_encoding, device)
    return detached, {key: value.detach() for key, value in leaves.items()}


def _is_scale(key: str) -> bool:
    """Outputs that are parameters of the loss (temperatures, bias), not per-sample features."""
    return key.startswith("logit_")
