"""The papers' optimizers (AdamW, LAMB, Adafactor) and schedules (warm-up, then cosine, linear,
constant or rsqrt, then cooldown) through the DeepSpeed engine under ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tritower.launch.cli import load_config
from tritower.launch.config import ConfigError
from tritower.launch.engine.ds_config import build_ds_config
from tritower.launch.optim.config import OptimConfig
from tritower.launch.optim.optimizers import client_scheduler, lr_factor


def _opt(**fields) -> OptimConfig:
    return OptimConfig(**{"warmup_steps": 10, "min_lr_ratio": 0.0, **fields})


def test_warmup_then_each_schedule_by_hand() -> None:
    total = 110
    for schedule in ("cosine", "linear", "constant", "rsqrt"):
        opt = _opt(schedule=schedule)
        # DeepSpeed's warm-up: update i runs at max(i - 1, 0) / warmup_steps of the peak.
        assert [lr_factor(s, opt, total) for s in (0, 1, 2, 9, 10)] == [0.0, 0.0, 0.1, 0.8, 0.9]
    assert lr_factor(11, _opt(schedule="constant"), total) == 1.0
    # 100 steps of decay after the 10 of warm-up: halfway is step 60.
    assert lr_factor(60, _opt(schedule="cosine"), total) == pytest.approx(0.5)
    assert lr_factor(60, _opt(schedule="linear"), total) == pytest.approx(0.5)
    assert lr_factor(110, _opt(schedule="cosine", min_lr_ratio=0.1), total) == pytest.approx(0.1)
    assert lr_factor(60, _opt(schedule="constant"), total) == 1.0
    # rsqrt: 1/sqrt(1 + t/timescale), timescale = warm-up steps unless given.
    assert lr_factor(20, _opt(schedule="rsqrt"), total) == pytest.approx(1 / math.sqrt(2))
    assert lr_factor(50, _opt(schedule="rsqrt", rsqrt_timescale=40), total) == pytest.approx(1 / math.sqrt(2))


def test_cooldown_ramps_the_last_steps_to_zero() -> None:
    opt = _opt(schedule="constant", cooldown_steps=20)
    assert lr_factor(89, opt, 110) == 1.0
    assert lr_factor(90, opt, 110) == 1.0  # the first cooldown step: 20/20
    assert lr_factor(100, opt, 110) == pytest.approx(0.5)
    assert lr_factor(109, opt, 110) == pytest.approx(1 / 20)
    rsqrt = _opt(schedule="rsqrt", cooldown_steps=20)
    assert lr_factor(100, rsqrt, 110) == pytest.approx(0.5 / math.sqrt(1 + 90 / 10))


def _two_groups() -> torch.optim.Optimizer:
    weights, bias = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    return torch.optim.AdamW([{"params": [weights], "lr": 5e-4}, {"params": [bias], "lr": 5e-5}])


@pytest.mark.parametrize("warmup, total, floor", [(50, 450, 0.0), (3, 12, 0.0), (10, 100, 0.1), (2, 2, 0.0)])
def test_cosine_is_deepspeeds_warmup_cosine_float_for_float(warmup: int, total: int, floor: float) -> None:
    """DeepSpeed's own WarmupCosineLR (linear warm-up), the default's schedule before there was one
    implementation, is the reference: every group's lr equal at every update, past the end too."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    reference, ours = _two_groups(), _two_groups()
    deepspeed_lr = WarmupCosineLR(
        reference, total_num_steps=total, warmup_num_steps=warmup, cos_min_ratio=floor, warmup_type="linear"
    )
    schedule = client_scheduler(_opt(warmup_steps=warmup, min_lr_ratio=floor), total)(ours)
    for update in range(total + 3):
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in reference.param_groups], update
        reference.step(), deepspeed_lr.step(), ours.step(), schedule.step()


def test_a_saved_warmup_cosine_state_continues_exactly() -> None:
    """A checkpoint written while DeepSpeed's WarmupCosineLR was the schedule holds its state
    (``last_batch_iteration``); loaded into the schedule, the next learning rates are DeepSpeed's."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    reference = _two_groups()
    deepspeed_lr = WarmupCosineLR(
        reference, total_num_steps=40, warmup_num_steps=5, cos_min_ratio=0.0, warmup_type="linear"
    )
    for _ in range(7):
        reference.step(), deepspeed_lr.step()
    ours = _two_groups()
    schedule = client_scheduler(_opt(warmup_steps=5), 40)(ours)
    schedule.load_state_dict(deepspeed_lr.state_dict())
    assert schedule.get_last_lr() == [g["lr"] for g in reference.param_groups]
    for group, lr in zip(ours.param_groups, schedule.get_last_lr(), strict=True):
        group["lr"] = lr  # as the checkpointer sets them after a load
    for update in range(8, 45):
        reference.step(), deepspeed_lr.step(), ours.step(), schedule.step()
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in reference.param_groups], update


def test_the_policy_holds_no_schedule_and_an_old_schedule_block_must_agree(tmp_path: Path) -> None:
    cfg = load_config(["--experiment", "clip_tiny"])
    ds = build_ds_config(cfg, world_size=2, device_type="cpu")
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.1, "torch_adam": True},
    }
    assert "scheduler" not in ds and "zero_allow_untested_optimizer" not in ds
    old = json.loads(Path("zero_configs/z2.json").read_text())
    block = {"total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_min_ratio": 0.0, "cos_min_ratio": "auto"}
    for params, refused in [
        ({**block, "warmup_type": "linear"}, None),
        ({**block, "warmup_type": "linear", "warmup_num_steps": 7}, "optim.warmup_steps"),
        ({**block, "warmup_type": "log"}, "--optim.schedule"),
    ]:
        policy = tmp_path / "policy.json"
        policy.write_text(json.dumps({**old, "scheduler": {"type": "WarmupCosineLR", "params": params}}))
        cfg = load_config(["--experiment", "clip_tiny", f"--deepspeed.zero={policy}"])
        if refused is None:
            assert "scheduler" not in build_ds_config(cfg, world_size=2, device_type="cpu")
        else:
            with pytest.raises(ConfigError, match=refused):
                build_ds_config(cfg, world_size=2, device_type="cpu")


@pytest.mark.parametrize(
    "overrides, device, optimizer_type, scheduler",
    [
        (["--optim.name=adafactor"], "cpu", None, False),
        (["--optim.name=adafactor"], "cuda", None, False),
        (["--optim.name=lamb"], "cpu", None, False),  # timm's Lamb: DeepSpeed's FusedLamb is CUDA only
        (["--optim.name=lamb"], "cuda", "Lamb", False),
        (["--optim.schedule=rsqrt", "--optim.cooldown_steps=50"], "cpu", "AdamW", False),
        (["--optim.schedule=cosine", "--optim.cooldown_steps=50"], "cuda", "AdamW", False),
    ],
)
def test_policy_for_client_optimizers_and_schedules(
    overrides: list[str], device: str, optimizer_type: str | None, scheduler: bool
) -> None:
    ds = build_ds_config(load_config(overrides), world_size=2, device_type=device)
    assert ds.get("optimizer", {}).get("type") == optimizer_type
    assert ("scheduler" in ds) == scheduler
    if optimizer_type != "AdamW":
        assert ds["zero_allow_untested_optimizer"] is True
    assert "auto" not in json.dumps(ds)


def test_cuda_fused_adamw_preference_leaves_lamb_and_client_optimizers_alone() -> None:
    import torch

    from tritower.launch.engine.engine import _prefer_fused_adamw

    cuda = torch.device("cuda")
    lamb = _prefer_fused_adamw(build_ds_config(load_config(["--optim.name=lamb"]), 2, "cuda"), cuda)
    assert lamb["optimizer"] == {
        "type": "Lamb",
        "params": {"lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.1},
    }
    adafactor = _prefer_fused_adamw(build_ds_config(load_config(["--optim.name=adafactor"]), 2, "cuda"), cuda)
    assert "optimizer" not in adafactor
    adamw = _prefer_fused_adamw(build_ds_config(load_config([]), 2, "cuda"), cuda)
    assert adamw["optimizer"]["params"]["fused"] is True


def test_bad_optimizer_and_schedule_fail_naming_the_choices(usage_error) -> None:
    message = "invalid choice 'sgd' for argument '--optim.name'. Expected one of ('adamw', 'lamb', 'adafactor')"
    assert message in usage_error(load_config, ["--optim.name=sgd"])
    assert "Expected one of ('cosine', 'linear', 'constant', 'rsqrt')" in usage_error(
        load_config, ["--optim.schedule=step"]
    )
    with pytest.raises(ConfigError, match="exceed train.steps"):
        load_config(["--optim.cooldown_steps=1000"])
    cfg = load_config(["--optim.name=adafactor", "--zero=zero_configs/z3_offload.json"])
    with pytest.raises(ConfigError, match="offloads the optimizer"):
        build_ds_config(cfg, world_size=2, device_type="cpu")


STEPS, RESUME_AT = 10, 5


@pytest.mark.launch
@pytest.mark.parametrize(
    "name, zero, schedule",
    [
        ("lamb", "z2", ["--optim.schedule=linear"]),
        ("lamb", "z3", ["--optim.schedule=cosine", "--optim.cooldown_steps=3"]),
        ("adafactor", "z2", ["--optim.schedule=constant", "--optim.cooldown_steps=3"]),
        ("adafactor", "z3", ["--optim.schedule=rsqrt", "--optim.cooldown_steps=3"]),
        # adamw, the default, trains and resumes exactly in tests/test_resume.py and test_train_distributed.py
    ],
)
def test_optimizer_trains_and_resumes_exactly_on_two_ranks(train, name: str, zero: str, schedule: list[str]) -> None:
    common = [
        f"--optim.name={name}",
        *schedule,
        f"--train.steps={STEPS}",
        "--train.log_every=1",
        f"--checkpoint.every_steps={RESUME_AT}",
        "--checkpoint.keep_last=0",
        "--eval.at_end=False",
    ]
    whole = train(*common, "--train.run_name=whole", zero=f"zero_configs/{zero}.json")
    losses = whole.losses()
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses  # the loss falls
    # The learning rate follows the schedule (the record's lr is the next step's: index = step).
    cfg = load_config(["--experiment", "clip_test", *common])
    for record in whole.steps()[:-1]:
        assert record["lr"] == pytest.approx(cfg.optim.lr * lr_factor(record["step"], cfg.optim, STEPS), rel=1e-6)
    checkpoint = whole.run_dir / "checkpoints" / f"step{RESUME_AT:08d}"
    resumed = train(*common, "--train.run_name=resumed", f"--resume={checkpoint}", zero=f"zero_configs/{zero}.json")
    assert f"resumed from {checkpoint} at step {RESUME_AT}" in resumed.output
    assert resumed.losses() == losses[RESUME_AT:]  # optimizer and schedule state restored exactly
    assert resumed.metrics["loss"] == whole.metrics["loss"]


def test_a_resume_keeps_its_position_and_takes_this_runs_peak_rate() -> None:
    """The divergence advice resumes with a lower ``--optim.lr``: the saved schedule brings its
    step, never its old peak."""
    saved_run = _two_groups()
    for group in saved_run.param_groups:
        group["lr"] *= 1e6
    saved = client_scheduler(_opt(warmup_steps=5), 40)(saved_run)
    for _ in range(7):
        saved_run.step(), saved.step()
    resumed_run = _two_groups()
    resumed = client_scheduler(_opt(warmup_steps=5), 40)(resumed_run)
    resumed.load_state_dict(saved.state_dict())
    factor = lr_factor(7, _opt(warmup_steps=5), 40)
    assert resumed.last_epoch == 7 and resumed.get_last_lr() == [5e-4 * factor, 5e-5 * factor]
