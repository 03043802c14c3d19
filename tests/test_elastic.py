"""Elastic resume: a 2-rank run's checkpoint continued on 1 rank sees the same global samples at
every step and reaches the uninterrupted 2-rank run's losses and weights within float tolerance.

Real launches on CPU ranks (gloo): the reference runs 6 steps on 2 ranks under ZeRO-2 and keeps
its step-3 checkpoint; a copy of its run folder holding only that checkpoint is resumed with
``--resume auto`` on 1 rank. Not bit-exact: one rank encodes the 32 samples in one forward where
two ranks encode 16 each, and the gradient is one sum instead of an all-reduce of two, so the
float reduction order differs (``TOLERANCE`` gives what was measured).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from launching import losses_by_step, read_log

pytestmark = pytest.mark.launch

COMMON = (
    "--train.log_every=1",
    "--train.log_sample_keys=true",
    "--train.steps=6",
    "--train.run_name=run",
    "--checkpoint.every_steps=3",
    "--checkpoint.keep_last=0",
    "--eval.at_end=false",
)
TOLERANCE = {"fp32": dict(rtol=1e-5, atol=1e-6), "bf16": dict(rtol=5e-4, atol=2e-3)}
"""On losses (rtol) and final weights (rtol, atol) after 3 resumed steps. Measured: fp32 losses
equal to the last bit under ZeRO-1 and ZeRO-2 (within 7e-8 with GradCache), weights within
1.2e-7; bf16 losses within 6.3e-5 relative, weights (saved in bf16) within 9.8e-4, one bf16 step
at their magnitude."""


def _keys_by_step(run: Path) -> dict[int, list[str]]:
    return {record["step"]: record["keys"] for record in read_log(run) if "keys" in record}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


@pytest.mark.parametrize(
    "zero,precision,micro",
    [("z2", "fp32", 0), ("z1", "fp32", 0), ("z2", "bf16", 0), ("z2", "fp32", 8)],
    ids=["z2-fp32", "z1-fp32", "z2-bf16", "z2-fp32-gradcache"],
)
def test_two_ranks_resumed_on_one_rank_match_the_uninterrupted_run(
    train, tmp_path: Path, zero: str, precision: str, micro: int
) -> None:
    """``micro``: GradCache micro-batches of this size (8: 2 a rank on 2 ranks, 4 on 1 rank)."""
    reference = tmp_path / "runs" / "run"
    common = (*COMMON, f"--deepspeed.precision={precision}", f"--train.micro_batch_size={micro}")
    train(*common, ranks=2, zero=f"zero_configs/{zero}.json")

    # The reference's folder as a run preempted right after its step-3 checkpoint.
    resumed = tmp_path / "elastic" / "run"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000006")
    (resumed / "checkpoints" / "latest").write_text("step00000003")
    for name in ("metrics.json", "train_log.jsonl", "lock"):
        (resumed / name).unlink(missing_ok=True)
    output = train(*common, "--resume=auto", f"--train.output_dir={tmp_path / 'elastic'}", ranks=1,
                   zero=f"zero_configs/{zero}.json").output  # fmt: skip
    assert "elastic resume from 2 to 1 ranks" in output, output[-3000:]

    expected_keys, got_keys = _keys_by_step(reference), _keys_by_step(resumed)
    assert sorted(got_keys) == [4, 5, 6]
    for step in got_keys:
        assert len(got_keys[step]) == 32 and got_keys[step] == expected_keys[step], step
    expected, got = losses_by_step(reference), losses_by_step(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=TOLERANCE[precision]["rtol"]), step
    final_ref, final_got = _weights(reference), _weights(resumed)
    assert final_ref.keys() == final_got.keys()
    for name in final_ref:
        torch.testing.assert_close(final_got[name], final_ref[name], **TOLERANCE[precision], msg=name)
