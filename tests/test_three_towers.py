"""Three Towers (3T): the loss (the model's heads, the alpha mixture and its export are in
``test_three_towers_model.py``).

Every number is checked against an independent float64 reference written from the formulas of
docs/towers.md, never against the code under test:

- the loss L = (1/3) [w_fg L(f,g) + w_fh L(f_h,h_f) + w_gh L(g_h,h_g)], L CLIP's symmetric
  cross-entropy written from its definition: value and gradients for impl naive and tiled (and
  triton under ``TRITON_INTERPRET=1``, in a subprocess as ``test_loss_triton.py`` does), odd
  sizes, weights and temperatures; on 2 gloo ranks (naive, tiled; triton in the subprocess)
  equal to the one-process loss with exactly one all_gather per step; NaN inputs raise
  ``NonFiniteInputError`` on every rank;

Run: ``pytest tests/test_three_towers.py`` (CPU; one 2-rank gloo spawn, one triton subprocess).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tritower.losses import LossConfig, NonFiniteInputError, ThreeTowersObjective, three_towers_loss
from tritower.losses.three_towers import INPUT_KEYS, TERMS

VOCAB = 64
WEIGHTS = (1.0, 1.0, 1.0)
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}


# ---- the float64 reference, from the formulas -----------------------------------------------


def reference_clip(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's loss: the mean of the a->b and b->a cross-entropies of logits s a b^T."""
    logits = scale.reshape(()) * (a @ b.T)  # [N, N]
    n = a.shape[0]
    a_to_b = -sum(logits[i, i] - torch.log(torch.exp(logits[i, :]).sum()) for i in range(n)) / n
    b_to_a = -sum(logits[i, i] - torch.log(torch.exp(logits[:, i]).sum()) for i in range(n)) / n
    return (a_to_b + b_to_a) / 2


def reference_loss(inputs: dict[str, torch.Tensor], weights=WEIGHTS) -> tuple[torch.Tensor, list]:
    """(1/3) [w_fg L(f, g; s_fg) + w_fh L(f_h, h_f; s_fh) + w_gh L(g_h, h_g; s_gh)] and the terms."""
    s_3t = inputs["logit_scale_3t"]
    terms = [
        reference_clip(inputs["image_features"], inputs["text_features"], inputs["logit_scale"]),
        reference_clip(inputs["image_features_3t"], inputs["third_image_features"], s_3t[0]),
        reference_clip(inputs["text_features_3t"], inputs["third_text_features"], s_3t[1]),
    ]
    return sum(w * t for w, t in zip(weights, terms)) / 3, terms


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def random_inputs(batch: int, dim: int, seed: int, scales=(14.0, 30.0, 70.0)) -> dict[str, torch.Tensor]:
    """Unit-norm float64 features for the six feature keys and the three multipliers."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        key: unit(torch.randn(batch, dim, generator=g, dtype=torch.float64)) for key in INPUT_KEYS if "scale" not in key
    }
    inputs["logit_scale"] = torch.tensor([scales[0]], dtype=torch.float64)
    inputs["logit_scale_3t"] = torch.tensor(scales[1:], dtype=torch.float64)
    return inputs


def with_grads(inputs: dict[str, torch.Tensor], dtype: torch.dtype, compute) -> tuple:
    """(total, terms, {key: gradient}) of ``compute(leaves)`` on copies of ``inputs`` in ``dtype``."""
    leaves = {k: v.to(dtype).clone().requires_grad_() for k, v in inputs.items()}
    total, terms = compute(leaves)
    grads = torch.autograd.grad(total, list(leaves.values()))
    return total, terms, dict(zip(leaves, grads, strict=True))


def reference_with_grads(inputs: dict[str, torch.Tensor], weights=WEIGHTS) -> tuple:
    return with_grads(inputs, torch.float64, lambda leaves: reference_loss(leaves, weights))


def loss_with_grads(inputs, dtype, impl, weights=WEIGHTS, **kwargs) -> tuple:
    def compute(leaves):
        total, terms = three_towers_loss(*(leaves[k] for k in INPUT_KEYS), weights=weights, impl=impl, **kwargs)
        return total, [terms[name] for name in TERMS]

    return with_grads(inputs, dtype, compute)


def assert_matches(got: tuple, want: tuple, rtol: float, atol: float, label: str = "") -> None:
    torch.testing.assert_close(got[0].double(), want[0], rtol=rtol, atol=atol, msg=f"{label} value")
    for k, (g, w) in enumerate(zip(got[1], want[1], strict=True)):
        torch.testing.assert_close(g.double(), w.detach(), rtol=rtol, atol=atol, msg=f"{label} term {k}")
    for key in want[2]:
        torch.testing.assert_close(
            got[2][key].double(), want[2][key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{label} d/d{key}: {m}"
        )


# ---- the loss, one process --------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,dim", [(7, 5), (13, 9)])
def test_loss_matches_float64_reference(impl: str, dtype: torch.dtype, batch: int, dim: int) -> None:
    inputs = random_inputs(batch, dim, seed=batch * 10 + dim)
    got = loss_with_grads(inputs, dtype, impl, tile_size=4)  # tiles of 4: partial tiles, split diagonals
    assert_matches(got, reference_with_grads(inputs), *TOLERANCES[dtype], label=impl)


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_weights_and_temperatures_are_honoured(impl: str) -> None:
    weights = (0.5, 0.0, 2.0)
    inputs = random_inputs(11, 6, seed=3, scales=(5.0, 40.0, 90.0))
    want = reference_with_grads(inputs, weights)
    got = loss_with_grads(inputs, torch.float64, impl, weights=weights, tile_size=4)
    assert_matches(got, want, *TOLERANCES[torch.float64], label=impl)
    # A weight of 0 stops that term's gradient, and its value is still reported.
    assert torch.count_nonzero(got[2]["third_image_features"]) == 0 and got[1][1] > 0
    assert got[2]["logit_scale_3t"][0] == 0 and got[2]["logit_scale_3t"][1] != 0
    # Swapping the two 3T temperatures changes the loss: each term reads its own.
    swapped = dict(inputs, logit_scale_3t=inputs["logit_scale_3t"].flip(0))
    assert not torch.isclose(loss_with_grads(swapped, torch.float64, impl, weights=weights)[0], got[0])


def test_module_reads_the_model_dict_and_config() -> None:
    inputs = random_inputs(9, 4, seed=5)
    config = LossConfig(impl="tiled", tile_size=4, weight_main=2.0, weight_image_third=0.25, weight_text_third=1.5)
    result = ThreeTowersObjective(config)({**inputs, "unused": torch.ones(1)})
    total, terms = result["loss"], result
    want, want_terms = reference_loss(inputs, (2.0, 0.25, 1.5))
    torch.testing.assert_close(total, want)
    for name, value in zip(TERMS, want_terms, strict=True):
        torch.testing.assert_close(terms[name], value)
        assert not terms[name].requires_grad
    with pytest.raises(KeyError, match="third_text_features"):
        ThreeTowersObjective(LossConfig())({k: v for k, v in inputs.items() if k != "third_text_features"})
    with pytest.raises(ValueError, match="sigmoid.*not supported"):
        ThreeTowersObjective(LossConfig(kind="sigmoid"))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight_text_third"):
            LossConfig(weight_text_third=bad)


@pytest.mark.parametrize("key", ["third_image_features", "logit_scale_3t", "text_features"])
def test_nonfinite_inputs_raise(key: str) -> None:
    inputs = random_inputs(5, 4, seed=1)
    inputs[key] = inputs[key].clone()
    inputs[key].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteInputError, match=f"{key}: 1 non-finite"):
        ThreeTowersObjective(LossConfig())(inputs)


# ---- the loss on 2 gloo ranks -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def count_gathers() -> list[str]:
    """Wrap torch.distributed's gathers (looked up at call time) to count the calls."""
    calls: list[str] = []
    for name in ("all_gather", "all_gather_into_tensor"):
        original = getattr(dist, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, counting)
    return calls


def check_rank(rank: int, world: int, impl: str, scope: str, calls: list[str]) -> None:
    batch = 7
    inputs = random_inputs(world * batch, 6, seed=11)
    rows = slice(rank * batch, (rank + 1) * batch)
    local = {k: v[rows] if "scale" not in k else v for k, v in inputs.items()}
    before = len(calls)
    got = loss_with_grads(local, torch.float32, impl, tile_size=4, scope=scope)
    if scope == "global":
        assert len(calls) - before == 1, f"{impl}: {calls[before:]} (expected one all_gather)"
        value, terms, grads = reference_with_grads(inputs)
        want_grads = {k: g if "scale" in k else world * g[rows] for k, g in grads.items()}
    else:
        assert len(calls) == before, calls[before:]
        per_rank = [
            reference_with_grads(
                {k: v[r * batch : (r + 1) * batch] if "scale" not in k else v for k, v in inputs.items()}
            )
            for r in range(world)
        ]
        value = torch.stack([p[0] for p in per_rank]).mean()
        terms = [torch.stack([p[1][t] for p in per_rank]).mean() for t in range(3)]
        want_grads = dict(per_rank[rank][2])
        for key in ("logit_scale", "logit_scale_3t"):
            want_grads[key] = torch.stack([p[2][key] for p in per_rank]).mean(0)
    # Replicated temperatures: DeepSpeed applies the mean over ranks of their gradients.
    for key in ("logit_scale", "logit_scale_3t"):
        dist.all_reduce(got[2][key])
        got[2][key] /= world
    assert_matches(got, (value, terms, want_grads), 2e-5, 2e-6, label=f"rank {rank} {impl} {scope}")


def rank_worker(rank: int, world: int, port: int, impls: tuple[str, ...] = ("naive", "tiled")) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        calls = count_gathers()
        for impl in impls:
            for scope in ("global", "local"):
                check_rank(rank, world, impl, scope, calls)
        inputs = random_inputs(4, 3, seed=rank)
        if rank == world - 1:
            inputs["third_text_features"][0, 0] = float("nan")
        with pytest.raises(NonFiniteInputError, match=f"over {world} ranks.*third_text_features: 1"):
            ThreeTowersObjective(LossConfig(impl="tiled"))(inputs)
        dist.barrier()  # every rank raised, none is left waiting in a collective
    finally:
        dist.destroy_process_group()


@pytest.mark.launch
def test_two_gloo_ranks_equal_one_process_with_one_gather() -> None:
    mp.spawn(rank_worker, args=(2, free_port()), nprocs=2, join=True)


# ---- triton, under the interpreter in a fresh process -----------------------------------------


@pytest.mark.launch
def test_triton_under_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "3T triton checks passed" in done.stdout


def check_triton() -> None:
    for batch, dim, dtype in ((13, 9, torch.float64), (33, 16, torch.float32)):
        inputs = random_inputs(batch, dim, seed=batch)
        got = loss_with_grads(inputs, dtype, "triton", weights=(1.0, 0.5, 2.0), tile_size=16)
        assert_matches(got, reference_with_grads(inputs, (1.0, 0.5, 2.0)), *TOLERANCES[dtype], label="triton")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run via pytest or set TRITON_INTERPRET=1"
    check_triton()
    mp.spawn(rank_worker, args=(2, free_port(), ("triton",)), nprocs=2, join=True)
    print("3T triton checks passed")
