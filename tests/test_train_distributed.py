"""Real multi-rank DeepSpeed launches on CPU ranks (gloo): invariance, ZeRO stages, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, deepspeed_launch, final_metrics, losses_logged

PROBE = REPO / "tests" / "scripts" / "grad_probe.py"


def _stage0_policy(tmp_path: Path) -> str:
    policy = json.loads((REPO / "zero_configs" / "z1.json").read_text())
    policy["zero_optimization"] = {"stage": 0}
    path = tmp_path / "z0.json"
    path.write_text(json.dumps(policy))
    return str(path)


def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path: Path) -> None:
    """Per-rank batch b on 2 ranks == batch 2b on 1 rank: loss and every gradient, ZeRO-0 and 3."""
    policies = [_stage0_policy(tmp_path), str(REPO / "zero_configs" / "z3.json")]
    saved = {}
    for ranks in (1, 2):
        out = tmp_path / f"probe{ranks}.pt"
        args = [arg for policy in policies for arg in ("--zero", policy)] + ["--global-batch", "8", "--out", str(out)]
        deepspeed_launch(PROBE, args, ranks=ranks, cwd=REPO)
        saved[ranks] = torch.load(out)
    for policy in policies:
        one, two = saved[1][policy], saved[2][policy]
        assert abs(one["loss"] - two["loss"]) < 1e-5, (policy, one["loss"], two["loss"])
        assert one["grads"].keys() == two["grads"].keys()
        for name, grad in one["grads"].items():
            assert grad.abs().sum() > 0 or "bias" in name, f"{name} got no gradient"
            torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"{policy} {name}")
    # ZeRO-0 and ZeRO-3 agree with each other too.
    for name, grad in saved[1][policies[0]]["grads"].items():
        torch.testing.assert_close(saved[1][policies[1]]["grads"][name], grad, rtol=1e-4, atol=1e-6)


def test_gradcache_micro_batches_equal_one_big_batch(tmp_path: Path) -> None:
    """4 GradCache micro-batches of b per rank == one batch of 4b: loss and every gradient (ZeRO-1, 3)."""
    policies = [str(REPO / "zero_configs" / f"{z}.json") for z in ("z1", "z3")]
    saved = {}
    for micro in (0, 2):
        out = tmp_path / f"probe_micro{micro}.pt"
        args = [arg for policy in policies for arg in ("--zero", policy)]
        args += ["--global-batch", "16", "--micro-batch-size", str(micro), "--out", str(out)]
        deepspeed_launch(PROBE, args, ranks=2, cwd=REPO)
        saved[micro] = torch.load(out)
    for policy in policies:
        whole, cached = saved[0][policy], saved[2][policy]
        assert abs(whole["loss"] - cached["loss"]) < 1e-6, (policy, whole["loss"], cached["loss"])
        for name, grad in whole["grads"].items():
            torch.testing.assert_close(cached["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=f"{policy} {name}")


@pytest.mark.parametrize("zero", ["z1", "z2", "z3"])
def test_stage_trains_saves_and_resumes(zero: str, train, tmp_path: Path) -> None:
    output = train(f"--zero=zero_configs/{zero}.json", "--train.steps=16", "--train.log_every=2",
                   "--wandb.mode=offline" if zero == "z3" else "--wandb.mode=disabled")
    losses = losses_logged(output)
    assert len(losses) == 8
    assert min(losses[-3:]) < losses[0] - 0.05, f"loss did not fall: {losses}"
    checkpoints = tmp_path / "runs" / "clip_test" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step00000016"
    metrics = final_metrics(output)
    assert metrics["step"] == 16 and metrics["world_size"] == 2
    if zero == "z3":
        assert list((tmp_path / "runs" / "clip_test" / "wandb").glob("offline-run-*")), "no offline wandb run written"
    resumed = train(f"--zero=zero_configs/{zero}.json", f"--resume={checkpoints}", "--train.steps=18",
                    "--train.log_every=1", "--wandb.mode=disabled", "--checkpoint.save_at_end=false")
    assert f"resumed from {checkpoints} at step 16" in resumed
    assert [line.split("|")[0].strip() for line in resumed.splitlines() if line.startswith("step ")] == ["step 17/18", "step 18/18"]
    assert losses_logged(resumed)[0] < losses[0]
