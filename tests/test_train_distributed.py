"""Real multi-rank DeepSpeed launches on CPU ranks (gloo): invariance, ZeRO stages, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launching import REPO, deepspeed_launch

pytestmark = pytest.mark.launch

PROBE = REPO / "tests" / "scripts" / "grad_probe.py"


def _stage0_policy(tmp_path: Path) -> str:
    policy = json.loads((REPO / "zero_configs" / "z1.json").read_text())
    policy["zero_optimization"] = {"stage": 0}
    path = tmp_path / "z0.json"
    path.write_text(json.dumps(policy))
    return str(path)


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two launches of the gradient probe: 1 rank and 2 ranks, every case in one engine each."""
    tmp_path = tmp_path_factory.mktemp("probes")
    z0, z1, z3 = (
        _stage0_policy(tmp_path),
        str(REPO / "zero_configs" / "z1.json"),
        str(REPO / "zero_configs" / "z3.json"),
    )
    z2 = str(REPO / "zero_configs" / "z2.json")
    # One reduction per step (train.coalesce_grad_reduction) on ZeRO-1, 2, 3 and with a locked tower.
    coalesced = [f"{z}:2::coalesce" for z in (z1, z2, z3)] + [f"{z3}:2:Lu:coalesce"]
    cases = {
        1: [z0, z3],
        2: [z0, z1, z2, z3, f"{z1}:2", f"{z2}:2", f"{z3}:2", f"{z3}:0:Lu", f"{z3}:2:Lu", f"{z3}:0:3T", f"{z3}:2:3T"]
        + coalesced,
    }
    saved = {"paths": (z0, z1, z3), "z2": z2}
    for ranks, rank_cases in cases.items():
        out = tmp_path / f"probe{ranks}.pt"
        args = [arg for case in rank_cases for arg in ("--case", case)] + ["--global-batch", "16", "--out", str(out)]
        deepspeed_launch(PROBE, args, ranks=ranks, cwd=REPO)
        saved[ranks] = torch.load(out)
    return saved


def _assert_same(a: dict, b: dict, what: str, loss_tol: float = 1e-5) -> None:
    assert abs(a["loss"] - b["loss"]) < loss_tol, (what, a["loss"], b["loss"])
    assert a["grads"].keys() == b["grads"].keys()
    for name, grad in a["grads"].items():
        assert grad.abs().sum() > 0, f"{what}: {name} got no gradient"
        # fp32 sums in another order differ by ~1e-7 on elements that nearly cancel (a bias whose
        # gradient is ~5e-5): elementwise atol 1e-6, plus the whole tensor to 1e-5 in norm.
        torch.testing.assert_close(
            b["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{what} {name}: {m}"
        )
        # (the floor: attention key biases have an exactly-zero gradient, softmax being shift-invariant)
        assert (b["grads"][name] - grad).norm() <= 1e-5 * grad.norm() + 1e-8, f"{what} {name}: relative norm error"


def test_two_ranks_equal_one_rank_with_twice_the_batch(probes: dict) -> None:
    """Per-rank batch b on 2 ranks == batch 2b on 1 rank: loss and every gradient, ZeRO-0 and 3."""
    z0, _, z3 = probes["paths"]
    for policy in (z0, z3):
        _assert_same(probes[1][policy], probes[2][policy], f"world size, {policy}")
    _assert_same(probes[1][z0], probes[1][z3], "ZeRO-0 vs ZeRO-3")


def test_gradcache_micro_batches_equal_one_big_batch(probes: dict) -> None:
    """4 GradCache micro-batches of b per rank == one batch of 4b: loss and every gradient (ZeRO-1, 3)."""
    _, z1, z3 = probes["paths"]
    for policy in (z1, z3):
        _assert_same(probes[2][policy], probes[2][f"{policy}:2"], f"GradCache, {policy}", loss_tol=1e-6)


def test_gradcache_with_coalesced_reduction_equals_one_big_batch(probes: dict) -> None:
    """train.coalesce_grad_reduction (one reduction per step, DeepSpeed's coalesce_grad_reduction):
    4 micro-batches per rank == one batch of 4b and == the per-micro-batch path, on ZeRO-1, 2 and 3,
    and with a locked tower outside the engine (Lu, ZeRO-3). ZeRO-2's per-micro-batch path too."""
    _, z1, z3 = probes["paths"]
    z2 = probes["z2"]
    _assert_same(probes[2][z2], probes[2][f"{z2}:2"], f"GradCache, {z2}", loss_tol=1e-6)
    for policy in (z1, z2, z3):
        whole, micro, coalesced = probes[2][policy], probes[2][f"{policy}:2"], probes[2][f"{policy}:2::coalesce"]
        assert coalesced["coalesced"] and not micro["coalesced"], policy
        _assert_same(whole, coalesced, f"coalesced, {policy}", loss_tol=1e-6)
        _assert_same(micro, coalesced, f"coalesced vs per micro-batch, {policy}", loss_tol=1e-6)
    _assert_same(probes[2][f"{z3}:0:Lu"], probes[2][f"{z3}:2:Lu:coalesce"], "coalesced Lu", loss_tol=1e-6)


@pytest.mark.parametrize("setting", ["Lu", "3T"])
def test_gradcache_with_locked_towers_equals_one_big_batch(probes: dict, setting: str) -> None:
    """GradCache with a locked tower outside the engine (Lu) and with Three Towers' three loss terms:
    4 micro-batches equal the whole batch, loss and every trainable gradient (ZeRO-3, 2 ranks). The
    locked towers are encoded once per micro-batch and reused by the second pass."""
    _, _, z3 = probes["paths"]
    whole, micro = probes[2][f"{z3}:0:{setting}"], probes[2][f"{z3}:2:{setting}"]
    assert not any(name.startswith("image_tower.") for name in whole["grads"]) or setting == "3T"
    if setting == "3T":
        assert any(name.startswith("third_proj") for name in whole["grads"])
    _assert_same(whole, micro, f"GradCache {setting}", loss_tol=1e-6)


@pytest.mark.parametrize("zero", ["z1", "z2", "z3"])
def test_stage_trains_saves_and_resumes(zero: str, train, tmp_path: Path) -> None:
    first = train(
        f"--zero=zero_configs/{zero}.json",
        "--train.steps=16",
        "--train.log_every=2",
        "--wandb.mode=offline" if zero == "z3" else "--wandb.mode=disabled",
    )
    assert [record["step"] for record in first.steps()] == list(range(2, 17, 2))
    losses = first.losses()
    assert min(losses[-3:]) < losses[0] - 0.05, f"loss did not fall: {losses}"
    checkpoints = tmp_path / "runs" / "clip_test" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step00000016"
    metrics = first.metrics
    assert metrics["step"] == 16 and metrics["world_size"] == 2
    if zero == "z3":
        assert list((tmp_path / "runs" / "clip_test" / "wandb").glob("offline-run-*")), "no offline wandb run written"
    resumed = train(
        f"--zero=zero_configs/{zero}.json",
        f"--resume={checkpoints}",
        "--train.steps=18",
        "--train.log_every=1",
        "--checkpoint.save_at_end=false",
        "--wandb.mode=offline" if zero == "z3" else "--wandb.mode=disabled",
    )
    if zero == "z3":  # the resumed run continues the same wandb run: its id came from the checkpoint
        runs = sorted((tmp_path / "runs" / "clip_test" / "wandb").glob("offline-run-*"))
        assert len(runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in runs}) == 1, runs
    assert f"resumed from {checkpoints / 'step00000016'} at step 16" in resumed.output
    assert [record["step"] for record in resumed.steps()] == [17, 18]  # appended to the first launch's log
    assert resumed.log_start == len(first.log) and resumed.metrics["step"] == 18
    assert resumed.losses()[0] < losses[0]
    # metrics.json labels both scopes: this start's steps, time and samples, and the whole run's.
    batch = metrics["global_batch"]
    assert (metrics["start_step"], metrics["this_start"]["steps"], metrics["run"]["steps"]) == (0, 16, 16)
    assert metrics["run"]["train_wall_s"] == metrics["this_start"]["train_wall_s"] == metrics["train_wall_s"]
    again = resumed.metrics
    assert (again["start_step"], again["this_start"]["steps"], again["run"]["steps"]) == (16, 2, 18)
    assert (again["this_start"]["data_samples"], again["run"]["data_samples"]) == (2 * batch, 18 * batch)
    assert again["data_samples"] == 18 * batch and again["this_start"]["train_wall_s"] == again["train_wall_s"]
    # The whole run's time holds the first start's 16 steps (up to its checkpoint) and this start's.
    assert again["run"]["train_wall_s"] >= 0.9 * metrics["train_wall_s"] + again["train_wall_s"]
