"""Exact resume after kill -9, a kill during a checkpoint write, and preemption by SIGUSR1.

Every run is a real 2-rank ``deepspeed`` launch on CPU ranks; the uninterrupted run is the
reference the interrupted ones must reproduce step for step (fp32, same world size).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import REPO, TRAIN, free_port, losses_by_step

pytestmark = pytest.mark.launch

COMMON = [
    "--zero=zero_configs/z2.json",
    "--experiment=clip_test",
    "--train.log_every=1",
    "--eval.at_end=false",
    "--wandb.mode=disabled",
    "--checkpoint.every_steps=3",
    "--checkpoint.keep_last=0",
]


def _launch(args: list[str], cache: Path, out: Path, env_extra: dict | None = None) -> subprocess.Popen:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [
        str(deepspeed),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(TRAIN),
        *COMMON,
        f"--data.cache_dir={cache}",
        f"--train.output_dir={out}",
        *args,
    ]
    env = dict(
        os.environ,
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        **(env_extra or {}),
    )
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(process: subprocess.Popen, timeout: int = 400) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def _weights(run: Path) -> dict[str, torch.Tensor]:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def _rank_pids(launcher: subprocess.Popen) -> list[int]:
    """The two train.py processes under the launcher (the ranks)."""
    out = subprocess.run(
        ["pgrep", "-g", str(os.getpgid(launcher.pid)), "-f", "launch/train.py"], capture_output=True, text=True
    ).stdout.split()
    return [
        int(pid)
        for pid in out
        if int(pid) != launcher.pid and "deepspeed.launcher" not in Path(f"/proc/{pid}/cmdline").read_text()
    ]


def _wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(losses_by_step(run), default=0) >= step:
            return
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def test_kill_at_random_step_then_resume_matches_uninterrupted(tmp_path: Path, data_cache: Path) -> None:
    steps = ["--train.steps=10", "--train.run_name=run"]
    code, output = _finish(_launch(steps, data_cache, tmp_path / "reference"))
    assert code == 0, output[-3000:]
    reference = tmp_path / "reference" / "run"

    interrupted = tmp_path / "interrupted" / "run"
    kill_after = random.Random(os.getpid()).randint(4, 8)  # past the step-3 checkpoint, before the end
    process = _launch(steps, data_cache, tmp_path / "interrupted")
    _wait_for_step(interrupted, kill_after, process)
    os.killpg(os.getpgid(process.pid), signal.SIGKILL)  # launcher and both ranks, no chance to clean up
    process.wait()
    code, output = _finish(_launch([*steps, "--resume=auto"], data_cache, tmp_path / "interrupted"))
    assert code == 0, output[-3000:]
    assert "resumed from" in output

    expected, got = losses_by_step(reference), losses_by_step(interrupted)
    assert set(got) == set(expected) == set(range(1, 11))
    for step in expected:  # the resumed steps overwrite nothing: later records win
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]} (killed after {kill_after})"
    final_ref, final_got = _weights(reference), _weights(interrupted)
    assert final_ref.keys() == final_got.keys()
    for name in final_ref:
        assert torch.equal(final_ref[name], final_got[name]), name


KILL_IN_SAVE = {
    "KILL_IN_SAVE_STEP": "6",
    "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO / "tests" / "scripts" / "kill_in_save"), os.environ.get("PYTHONPATH")])
    ),
}


def test_kill_during_checkpoint_write_leaves_previous_loadable(tmp_path: Path, data_cache: Path) -> None:
    run = tmp_path / "runs" / "run"
    args = ["--train.steps=8", "--train.run_name=run"]
    code, output = _finish(_launch(args, data_cache, tmp_path / "runs", KILL_IN_SAVE))
    assert code != 0
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step00000003"
    assert (checkpoints / "step00000006.partial").is_dir()  # the torn write is there, but not visible
    assert not (checkpoints / "step00000006").exists()
    code, output = _finish(_launch([*args, "--resume=auto"], data_cache, tmp_path / "runs"))
    assert code == 0, output[-3000:]
    assert f"resumed from {checkpoints / 'step00000003'} at step 3" in output
    assert (checkpoints / "latest").read_text().strip() == "step00000008"
    assert not (checkpoints / "step00000006.partial").exists()


def test_sigusr1_checkpoints_and_exits_with_requeue_code(tmp_path: Path, data_cache: Path) -> None:
    from tritower.launch.lifecycle.preemption import REQUEUE_EXIT_CODE

    run = tmp_path / "runs" / "run"
    process = _launch(["--train.steps=400", "--train.run_name=run"], data_cache, tmp_path / "runs")
    _wait_for_step(run, 2, process)
    ranks = _rank_pids(process)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGUSR1)  # SLURM signals every task; one rank alone must suffice
    code, output = _finish(process)
    assert code == REQUEUE_EXIT_CODE, output[-3000:]
    assert "stopping for preemption" in output
    tag = (run / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.removeprefix("step"))
    assert 2 <= stopped_at < 400
    assert max(losses_by_step(run)) == stopped_at


def test_nonfinite_losses_are_skipped_counted_then_stop_without_a_checkpoint(tmp_path: Path, data_cache: Path) -> None:
    run = tmp_path / "runs" / "run"
    args = [
        "--train.steps=30",
        "--train.run_name=run",
        "--optim.lr=1e30",
        "--optim.warmup_steps=0",
        "--train.max_nonfinite_in_row=3",
        "--checkpoint.every_steps=0",
    ]
    code, output = _finish(_launch(args, data_cache, tmp_path / "runs"))
    assert code == 3, output[-3000:]  # tritower.launch.lifecycle.preemption.DIVERGED_EXIT_CODE
    assert "non-finite" in output and "3 in a row" in output
    assert "3 non-finite losses in a row" in output and "Traceback" not in output
    # No checkpoint is written inside a non-finite streak; none was written before it either.
    assert "no checkpoint of this run was written before them" in output
    assert not (run / "checkpoints" / "latest").exists()

    # A run whose last steps are non-finite, fewer in a row than the limit, has not finished
    # either: it stops as diverged (3), with no evaluation of its NaN weights and no metrics.json.
    ended = tmp_path / "runs" / "ended"
    short = ["--train.steps=4", "--train.run_name=ended", "--train.max_nonfinite_in_row=5", "--eval.at_end=true"]
    code, output = _finish(_launch([*args[2:4], *short], data_cache, tmp_path / "runs"))
    assert code == 3, output[-3000:]
    assert "the run ended inside a streak of" in output and "Traceback" not in output, output[-3000:]
    assert not (ended / "metrics.json").exists() and "eval @ step" not in output
