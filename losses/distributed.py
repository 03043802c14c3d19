"""Cross-rank pieces shared by every loss implementation (torch.distributed only, no DeepSpeed).

The gradient convention all losses follow (see ``docs/loss.md``): with W ranks each holding a
local batch of b rows, the returned value is the global-batch loss (same on every rank), the
gradient w.r.t. a rank's local features is ``W * dL_global/d(local features)``, and the
gradient w.r.t. a replicated scalar (``logit_scale``, ``logit_bias``) averages over ranks to
``dL_global/d(scalar)``. An engine that averages gradients over ranks (DeepSpeed does) therefore
applies exactly the global-batch gradient. Every rank must pass the same local batch size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx

ProcessGroup = dist.ProcessGroup


def rank_and_world(group: ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; (0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def reduce_scatter_sum(full: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Sum ``full`` (shape [W*b, ...]) over ranks and return this rank's slice [b, ...].

    A reduce-scatter moves half the bytes of an all-reduce (a ring all-reduce is a
    reduce-scatter followed by an all-gather) and leaves each rank only its own rows, which
    is all it needs. Backends without one (older gloo) fall back to all-reduce + slice.
    """
    rank, world = rank_and_world(group)
    if world == 1:
        return full
    local_rows = full.shape[0] // world
    full = full.contiguous()
    out = torch.empty((local_rows, *full.shape[1:]), dtype=full.dtype, device=full.device)
    # torch 2.14 renamed reduce_scatter_tensor to reduce_scatter_single (the old name warns).
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        reduce_scatter(out, full, op=dist.ReduceOp.SUM, group=group)
        return out
    except (RuntimeError, NotImplementedError) as error:
        # Only a backend's "not supported", raised before any communication: any other error
        # (raised after this rank took part) would make it run one collective more than the others.
        if not isinstance(error, NotImplementedError) and "support" not in str(error).lower():
            raise
        summed = full.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        return summed[rank * local_rows : (rank + 1) * local_rows]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients of every rank's copy.

    Summing (not averaging) is what makes the convention work: rank r's local features appear
    as columns in every rank's loss term, and the sum over those terms is W * dL_global.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, local: Tensor, group: ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        _, world = rank_and_world(group)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)  # [W*b, D], rank-major

    @staticmethod
    def backward(ctx: FunctionCtx, grad_full: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return reduce_scatter_sum(grad_full, ctx.group), None


def gather_with_grad(local: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Concatenate every rank's ``local`` ([b, D] -> [W*b, D]); gradients flow back to owners.

    Gather each tower's features once and pass the result to several loss terms (Three Towers
    pairs image/text/third): autograd sums the terms' gradients before the single backward
    reduction.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return local
    return _GatherWithGrad.apply(local, group)


def average_value(local_loss: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Return the mean of ``local_loss`` over ranks as the value, keeping local gradients.

    ``local + (mean - local).detach()`` has the global value but the gradient of ``local``
    alone, so no collective runs in backward for the value itself.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return local_loss
    mean = local_loss.detach().clone()
    dist.all_reduce(mean, op=dist.ReduceOp.SUM, group=group)
    mean = mean / world
    return local_loss + (mean - local_loss).detach()


def logsumexp_across_ranks(partial_lse: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Combine per-rank partial log-sum-exps (same shape on every rank) into the global one.

    Uses a max all-reduce then a sum all-reduce of ``exp(partial - max)``, so nothing overflows
    and a column that is ``-inf`` on some ranks stays exact.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return partial_lse
    top = partial_lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = torch.exp(partial_lse - top)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return top + torch.log(sums)


def count_nonfinite(tensors: list[Tensor], group: ProcessGroup | None = None) -> list[int]:
    """Number of NaN/Inf entries in each tensor, summed over ranks.

    Summed so that every rank sees the same counts and raises together: a rank that raised
    alone would leave the others blocked in the loss's next collective.
    """
    counts = torch.stack([(~torch.isfinite(t.detach())).sum() for t in tensors]).to(torch.int64)
    _, world = rank_and_world(group)
    if world > 1:
        if dist.get_backend(group) == "nccl":
            counts = counts.to(tensors[0].device)
        else:
            counts = counts.cpu()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return [int(c) for c in counts.tolist()]
