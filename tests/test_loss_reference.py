"""Contrastive losses against a plain float64 reference, in one process and across gloo ranks.

The reference functions below are the loss formulas written out directly (logsumexp and
diagonal, no code from ``tritower.losses``); their gradients come from autograd in float64.
Other loss test modules load them from this file. Run: ``pytest tests/test_loss_*.py``.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tritower.losses import LossConfig, build_objective, clip_loss, gather_with_grad, sigmoid_loss


def reference_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean_i [lse_j S_ij - S_ii] + mean_j [lse_i S_ij - S_jj]), S = s * I T^T, float64."""
    logits = scale.double().reshape(()) * image.double() @ text.double().T
    image_to_text = (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()
    text_to_image = (torch.logsumexp(logits, dim=0) - logits.diagonal()).mean()
    return 0.5 * (image_to_text + text_to_image)


def reference_sigmoid_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """-(1/B) * sum_ij log sigmoid(z_ij * (s * x_i.y_j + bias)), z = 2 * eye - 1, float64."""
    logits = scale.double().reshape(()) * image.double() @ text.double().T + bias.double()
    signs = 2.0 * torch.eye(logits.shape[0], dtype=torch.float64) - 1.0
    return -torch.nn.functional.logsigmoid(signs * logits).sum() / logits.shape[0]


def reference_with_grads(kind: str, image, text, scale, bias=None) -> tuple[torch.Tensor, ...]:
    """Float64 value and gradients w.r.t. (image, text, scale[, bias])."""
    leaves = [t.detach().double().requires_grad_() for t in (image, text, scale)]
    if kind == "sigmoid":
        leaves.append(bias.detach().double().requires_grad_())
        value = reference_sigmoid_loss(*leaves)
    else:
        value = reference_clip_loss(*leaves)
    return (value.detach(), *torch.autograd.grad(value, leaves))


def random_inputs(batch: int, dim: int, seed: int, dtype=torch.float32, scale: float = 14.3):
    """L2-normalised features (as the towers give them), scale of shape [1], bias [1]."""
    gen = torch.Generator().manual_seed(seed)
    normalize = torch.nn.functional.normalize
    image = normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    # Make the text close to its image so positives dominate, as in a trained model.
    text = normalize(image + torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    return (image.to(dtype), text.to(dtype), torch.tensor([scale], dtype=dtype), torch.tensor([-5.0], dtype=dtype))


def loss_with_grads(kind: str, impl: str, image, text, scale, bias=None, **kwargs):
    """Value and gradients of the code under test for the same leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale)]
    if kind == "sigmoid":
        leaves.append(bias.detach().clone().requires_grad_())
        value = sigmoid_loss(*leaves, impl=impl, **kwargs)
    else:
        value = clip_loss(*leaves, impl=impl, **kwargs)
    return (value.detach(), *torch.autograd.grad(value, leaves))


def assert_close_all(got, want, rtol: float, atol: float) -> None:
    names = ["value", "d_image", "d_text", "d_scale", "d_bias"]
    for name, g, w in zip(names[: len(want)], got, want, strict=True):
        torch.testing.assert_close(g.double().reshape(w.shape), w, rtol=rtol, atol=atol, msg=name)


TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}


@pytest.mark.parametrize("batch", [1, 3, 7, 33])
@pytest.mark.parametrize("dim", [5, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_naive_matches_float64_reference(batch: int, dim: int, dtype, kind: str) -> None:
    inputs = random_inputs(batch, dim, seed=batch * 100 + dim, dtype=dtype)
    want = reference_with_grads(kind, *inputs)
    got = loss_with_grads(kind, "naive", *inputs)
    assert_close_all(got, want, *TOLERANCES[dtype])


@pytest.mark.parametrize("scale_shape", [(1,), ()])
def test_module_accepts_scale_shapes_and_returns_scalar(scale_shape) -> None:
    image, text, scale, bias = random_inputs(9, 16, seed=0)
    scale = scale.reshape(scale_shape).requires_grad_()
    outputs = {"image_features": image, "text_features": text, "logit_scale": scale}
    loss = build_objective(LossConfig(kind="softmax", impl="naive"))(outputs)["loss"]
    assert loss.shape == ()
    loss.backward()
    assert scale.grad.shape == scale_shape
    outputs = {"image_features": image, "text_features": text, "logit_scale": scale.detach(), "logit_bias": bias}
    sig = build_objective(LossConfig(kind="sigmoid"))(outputs)["loss"]
    torch.testing.assert_close(sig.double(), reference_sigmoid_loss(image, text, scale, bias))


# ---- several gloo ranks ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_rank_against_reference(
    rank: int, world: int, kind: str, impl: str, scope: str, batch: int, dim: int, tile_size: int
) -> None:
    """On one rank: value and the W-scaled gradient convention vs the float64 reference."""
    image, text, scale, bias = random_inputs(world * batch, dim, seed=world * 1000 + batch)
    rows = slice(rank * batch, (rank + 1) * batch)
    got = loss_with_grads(kind, impl, image[rows], text[rows], scale, bias, scope=scope, tile_size=tile_size)
    if scope == "global":
        value, d_image, d_text, *d_scalars = reference_with_grads(kind, image, text, scale, bias)
        want = [value, world * d_image[rows], world * d_text[rows], *d_scalars]
    else:  # value: mean of the ranks' local losses; gradients: this rank's local loss only
        per_rank = [
            reference_with_grads(
                kind, image[r * batch : (r + 1) * batch], text[r * batch : (r + 1) * batch], scale, bias
            )
            for r in range(world)
        ]
        want = list(per_rank[rank])
        want[0] = torch.stack([p[0] for p in per_rank]).mean()
        # Mean over ranks of the replicated scalars' gradients is what the engine applies.
        for k in range(3, len(want)):
            want[k] = torch.stack([p[k] for p in per_rank]).mean(0)
    # Scalars: check the mean over ranks (what DeepSpeed applies), not each rank's share.
    got = list(got)
    for k in range(3, len(got)):
        dist.all_reduce(got[k], op=dist.ReduceOp.SUM)
        got[k] = got[k] / world
    try:
        assert_close_all(got, want, rtol=2e-5, atol=2e-6)
    except AssertionError as err:
        raise AssertionError(f"rank {rank}/{world} {kind} {impl} {scope}: {err}") from None


def check_shared_gathers(rank: int, world: int) -> None:
    """Three Towers style: gather each tower once, reuse the gathers in three loss terms."""
    batch = 5
    towers = [random_inputs(world * batch, 12, seed=s)[0] for s in (1, 2, 3)]
    scales = [torch.tensor([s]) for s in (10.0, 20.0, 30.0)]
    rows = slice(rank * batch, (rank + 1) * batch)
    local = [t[rows].clone().requires_grad_() for t in towers]
    scale_leaves = [s.clone().requires_grad_() for s in scales]
    gathered = [gather_with_grad(t) for t in local]
    pairs = [(0, 1, "naive"), (0, 2, "tiled"), (1, 2, "naive")]
    loss = sum(
        clip_loss(
            local[a],
            local[c],
            scale_leaves[k],
            impl,
            tile_size=4,
            image_features_all=gathered[a],
            text_features_all=gathered[c],
        )
        for k, (a, c, impl) in enumerate(pairs)
    )
    got = torch.autograd.grad(loss, local + scale_leaves)
    leaves = [t.double().requires_grad_() for t in towers + scales]
    want_loss = sum(reference_clip_loss(leaves[a], leaves[c], leaves[3 + k]) for k, (a, c, _) in enumerate(pairs))
    want = torch.autograd.grad(want_loss, leaves)
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-6)
    for g, w in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(g.double(), world * w[rows], rtol=2e-5, atol=2e-6)
    for g, w in zip(got[3:], want[3:], strict=True):
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        torch.testing.assert_close(g.double() / world, w, rtol=2e-5, atol=2e-6)


def check_nonfinite_raises_on_every_rank(rank: int, world: int) -> None:
    """A NaN on the last rank only must raise everywhere, not leave ranks blocked."""
    image, text, scale, _ = random_inputs(4, 8, seed=rank)
    if rank == world - 1:
        text[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"over {world} ranks.*text_features: 1 non-finite"):
        clip_loss(image, text, scale, "tiled")


def distributed_worker(rank: int, world: int, port: int, cases: list[tuple]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for case in cases:
            check_rank_against_reference(rank, world, *case)
        check_shared_gathers(rank, world)
        check_nonfinite_raises_on_every_rank(rank, world)
        dist.barrier()  # every rank got past the raise
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, cases: list[tuple]) -> None:
    mp.spawn(distributed_worker, args=(world, free_port(), cases), nprocs=world, join=True)


@pytest.mark.launch
@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ranks_match_global_reference(world: int) -> None:
    # (kind, impl, scope, local batch, dim, tile_size). Local batches 7, 9 and 20 with tile 16
    # (global 14..80): partial tiles, and diagonals that cross tile edges at every rank offset.
    # One spawn per world size: process start-up dominates the cost of these tests.
    cases = [
        ("softmax", "naive", "global", 7, 5, 16),
        ("softmax", "naive", "local", 7, 64, 16),
        ("sigmoid", "naive", "global", 7, 5, 16),
        ("sigmoid", "naive", "local", 3, 64, 16),
        ("softmax", "tiled", "global", 9, 5, 16),
        ("softmax", "tiled", "global", 20, 64, 16),
        ("softmax", "tiled", "local", 9, 5, 16),
        ("sigmoid", "tiled", "global", 20, 5, 16),
        ("sigmoid", "tiled", "local", 9, 64, 16),
    ]
    run_ranks(world, cases)
