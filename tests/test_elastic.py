"""Elastic resume: a 2-rank run's checkpoint continued on 1 rank sees the same global samples at
every step and reaches the uninterrupted 2-rank run's losses and weights within float tolerance.

Real launches on CPU ranks (gloo): the reference runs 6 steps on 2 ranks under ZeRO-2 and keeps
its step-3 checkpoint; a copy of its run folder holding only that checkpoint is resumed with
``--resume auto`` on 1 rank. Not bit-exact: one rank encodes the 32 samples in one forward where
two ranks encode 16 each, and the gradient is one sum instead of an all-reduce of two, so the
float32 reduction order differs (relative differences of about 1e-7 per step, grown by Adam).
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
RTOL = 1e-4
"""Relative tolerance on losses and weights after 3 resumed steps (see the module docstring)."""


def _keys_by_step(run: Path) -> dict[int, list[str]]:
    return {record["step"]: record["keys"] for record in read_log(run) if "keys" in record}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_two_ranks_resumed_on_one_rank_match_the_uninterrupted_run(train, tmp_path: Path) -> None:
    reference = tmp_path / "runs" / "run"
    train(*COMMON, ranks=2, zero="zero_configs/z2.json")

    # The reference's folder as a run preempted right after its step-3 checkpoint.
    resumed = tmp_path / "elastic" / "run"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000006")
    (resumed / "checkpoints" / "latest").write_text("step00000003")
    for name in ("metrics.json", "train_log.jsonl", "lock"):
        (resumed / name).unlink(missing_ok=True)
    output = train(*COMMON, "--resume=auto", f"--train.output_dir={tmp_path / 'elastic'}", ranks=1,
                   zero="zero_configs/z2.json").output  # fmt: skip
    assert "elastic resume from 2 to 1 ranks" in output, output[-3000:]

    expected_keys, got_keys = _keys_by_step(reference), _keys_by_step(resumed)
    assert sorted(got_keys) == [4, 5, 6]
    for step in got_keys:
        assert len(got_keys[step]) == 32 and got_keys[step] == expected_keys[step], step
    expected, got = losses_by_step(reference), losses_by_step(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=RTOL), step
    final_ref, final_got = _weights(reference), _weights(resumed)
    assert final_ref.keys() == final_got.keys()
    for name in final_ref:
        torch.testing.assert_close(final_got[name], final_ref[name], rtol=RTOL, atol=1e-6, msg=name)
