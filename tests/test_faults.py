"""Faults that must never lose a good checkpoint or leave a run half-alive: divergence,
re-used and locked run folders, incomplete checkpoints, early one-line errors, signals to the
``deepspeed`` command and its launcher.

Every run is a real ``deepspeed`` launch on CPU ranks (gloo); runs that fail early cost only the
start-up.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from launching import REPO, TRAIN, launch_env, launcher_argv, read_log

from tritower.data import ensure_builtin_data
from tritower.launch.experiments import get_experiment

pytestmark = pytest.mark.launch

COMMON = [
    "--zero=zero_configs/z2.json",
    "--experiment=clip_test",
    "--train.log_every=1",
    "--eval.at_end=false",
    "--wandb.mode=disabled",
    "--train.run_name=run",
]


def _start(
    args: list[str],
    cache: Path,
    out: Path,
    ranks: int = 2,
    env: dict | None = None,
    supervised: bool = False,
    typed: bool = True,
) -> subprocess.Popen:
    """The run as a user types it (``typed``: the ``deepspeed`` command, whose processes the signal
    tests signal), or what that command starts (``python -m deepspeed.launcher.launch``: the same
    ranks, exit status and output, 2 s cheaper a launch) for the tests of what the ranks do."""
    run = [*COMMON, f"--data.cache_dir={cache}", f"--train.output_dir={out}", *args]
    command = launcher_argv(TRAIN, run, ranks=ranks, command=typed or supervised)
    if supervised:  # the user-facing command that exits 75 (launch/lifecycle/supervise.py)
        command = [sys.executable, "-m", "tritower.launch.lifecycle.supervise", *command]
    environment = launch_env(REPO, {"WANDB_MODE": "disabled", **(env or {})})
    return subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=_default_sigint,
    )  # fmt: skip


def _default_sigint() -> None:
    """SIGINT as in a terminal's job: a background job of a script without job control (``cmd &``)
    starts with SIGINT ignored, and Python then installs no KeyboardInterrupt, so the command
    would not react to the SIGINT this test sends it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _finish(process: subprocess.Popen, timeout: int = 400) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"launch timed out after {timeout} s (killed):\n{output[-4000:]}") from None
    return process.returncode, output


def _wait_gone(pid: int, timeout: float) -> None:
    """Waits until ``pid`` has exited (no longer exists, or is a zombie); AssertionError after ``timeout`` s."""
    deadline = time.time() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        assert time.time() < deadline, f"process {pid} still running ({state}) {timeout} s after the run ended"
        time.sleep(0.2)


def _run(args: list[str], cache: Path, out: Path, **kwargs) -> tuple[int, str]:
    return _finish(_start(args, cache, out, **{"typed": False, **kwargs}))


def _one_message(output: str, marker: str) -> str:
    """The one line holding ``marker``; no traceback anywhere."""
    assert "Traceback" not in output, output[-4000:]
    lines = [line for line in output.splitlines() if marker in line]
    assert len(lines) == 1, (lines, output[-3000:])
    return lines[0]


def _tags(checkpoints: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step")) for p in checkpoints.glob("step????????") if p.is_dir())


# ---- 1. divergence ---------------------------------------------------------------------------


def test_divergence_keeps_the_good_checkpoint_and_its_advice_works(tmp_path: Path, data_cache: Path) -> None:
    run = tmp_path / "runs" / "run"
    args = ["--train.steps=16", "--checkpoint.every_steps=2", "--checkpoint.keep_last=2"]
    code, output = _run([*args, "--optim.lr=1e3", "--train.max_nonfinite_in_row=3"], data_cache, tmp_path / "runs")
    assert code == 3, output[-3000:]
    message = _one_message(output, "tritower: stopped:")
    records = [r for r in read_log(run) if "loss" in r]
    losses = {r["step"]: r["loss"] for r in records}
    # lr=1e3 drives the logit scale to 0 and the loss to ln 32 exactly, then (on most runs) to NaN:
    # either way the run stops as diverged, naming the checkpoint from before the collapse.
    first_bad = min((step for step, loss in losses.items() if not math.isfinite(loss)), default=17)
    # The health rule: a collapsed step is no proof either (the checkpoint before it had collapsed).
    first_unhealthy = min(
        r["step"] for r in records
        if not math.isfinite(r["loss"]) or abs(r["loss"] - math.log(32)) <= 1e-3 or r["logit_scale"] < 0.01
    )  # fmt: skip
    checkpoints = run / "checkpoints"
    tags = _tags(checkpoints)
    assert tags and max(tags) < first_bad, (tags, first_bad)  # nothing saved inside the streak
    # A tag holds the weights after its step's update: the tag of step first_unhealthy - 1 made the
    # first unhealthy loss. The newest one before it is the good one; pruning (keep_last=2) spared it.
    good_step = (first_unhealthy - 2) // 2 * 2
    for tag in tags:  # every tag after the good one is marked suspect: --resume auto skips them
        assert (checkpoints / f"step{tag:08d}" / "suspect").is_file() == (tag > good_step), tag
    good = checkpoints / f"step{good_step:08d}"
    assert good_step in tags and (good / "manifest.json").is_file(), (tags, first_bad)
    assert str(good) in message and (checkpoints / "latest").read_text().strip() == good.name

    # Follow the advice as printed: resume from the named checkpoint with a lower learning rate.
    advice = re.search(r"--resume (\S+) --optim\.lr=", message)
    assert advice and advice.group(1) == str(good), message
    follow = [*args, "--resume", advice.group(1), "--optim.lr=1e-4", "--train.collapse_warn_steps=5"]
    code, output = _run(follow, data_cache, tmp_path / "runs")
    assert f"resumed from {good} at step {good_step}" in output
    resumed = [r for r in read_log(run) if "loss" in r][len(records) :]
    assert len(resumed) == 16 - good_step and all(math.isfinite(r["loss"]) for r in resumed), resumed
    # lr=1e3 may have damaged the weights of the good checkpoint already without the loss showing it
    # (its next loss is as at lr=5e-4); a continuation that collapses anyway is then said, never
    # reported as done: exit 0 only without 5 collapsed steps at the end, else 3 "ended collapsed".
    collapsed = [r["logit_scale"] < 0.01 or abs(r["loss"] - math.log(32)) <= 1e-3 for r in resumed]
    healthy_end = not all(collapsed[-5:])
    assert code == (0 if healthy_end else 3), output[-3000:]
    if not healthy_end:
        assert "the run ended collapsed" in _one_message(output, "tritower: stopped:")


# ---- 2 and 3. one run per folder; the last checkpoint before the last evaluation --------------


def test_a_reused_folder_is_refused_and_a_held_one_names_its_holder(tmp_path: Path, data_cache: Path) -> None:
    out, run = tmp_path / "runs", tmp_path / "runs" / "run"
    code, output = _run(["--train.steps=4", "--eval.at_end=true"], data_cache, out)
    assert code == 0, output[-3000:]
    # The end-of-training checkpoint is on disk before the final evaluation starts.
    assert output.index("checkpoint written (end of training)") < output.index("eval @ step 4")
    assert not (run / "lock").exists()  # released at exit

    code, output = _run(["--train.steps=6"], data_cache, out)  # the same folder, no --resume
    assert code == 2, output[-3000:]
    line = _one_message(output, "already holds checkpoints")
    assert "--resume auto" in line and "--train.run_name" in line
    assert "parameters per tower" not in output  # refused before any tower was built

    live = {"pid": os.getpid(), "host": socket.gethostname(), "start": "", "since": "now"}
    (run / "lock").write_text(json.dumps(live))  # this test process plays a live run
    code, output = _run(["--train.steps=6", "--resume=auto"], data_cache, out)
    assert code == 2, output[-3000:]
    line = _one_message(output, "is in use by another run")
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in line

    dead = max(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()) + 100000
    (run / "lock").write_text(json.dumps({**live, "pid": dead}))  # a run killed with -9
    code, output = _run(["--train.steps=5", "--resume=auto"], data_cache, out)
    assert code == 0, output[-3000:]
    assert f"took over the stale lock of pid {dead}" in output and "resumed from" in output

    # Resuming the finished run (a requeued job, --resume auto typed again) keeps its result.
    result = (run / "metrics.json").read_text()
    code, output = _run(["--train.steps=5", "--resume=auto"], data_cache, out)
    assert code == 0, output[-3000:]
    assert "finished at step 5" in _one_message(output, "nothing to do")
    assert (run / "metrics.json").read_text() == result and "parameters per tower" not in output


# ---- 6 and 7. resume falls back; mismatches fail early, once --------------------------------


def test_resume_falls_back_past_an_incomplete_tag_and_mismatches_fail_early(tmp_path: Path, data_cache: Path) -> None:
    out, checkpoints = tmp_path / "runs", tmp_path / "runs" / "run" / "checkpoints"
    scenes = ensure_builtin_data(replace(get_experiment("clip_test").data, cache_dir=str(data_cache)))
    shard_list = tmp_path / "shards.txt"  # the run's own shards: two of the built-in ones, by a list
    shard_list.write_text("\n".join(scenes.train_shards[:2]))
    data = [f"--data.train_shards={shard_list}", f"--data.vocab={scenes.vocab_path}"]
    saving = [*data, "--checkpoint.every_steps=2", "--checkpoint.keep_last=0"]
    code, output = _run(["--train.steps=4", *saving], data_cache, out)
    assert code == 0, output[-3000:]
    newest = checkpoints / "step00000004"
    next(newest.glob("*optim_states.pt")).unlink()  # one rank's optimizer file lost

    code, output = _run(["--train.steps=5", *saving, "--resume=auto"], data_cache, out)
    assert code == 0, output[-3000:]
    assert f"skipping checkpoint {newest}: step00000004 lost" in output
    assert f"resumed from {checkpoints / 'step00000002'} at step 2" in output

    early = {
        "written by 2 ranks, this run has 4": dict(ranks=4, args=data),  # 4 cannot share 2 data ranks
        "model.embed_dim=32 there, 64 here": dict(ranks=2, args=[*data, "--model.embed_dim=64"]),
        f"data.train_shards={str(shard_list)!r} there, {scenes.train_shards[0]!r} here": dict(
            ranks=2, args=[f"--data.train_shards={scenes.train_shards[0]}", f"--data.vocab={scenes.vocab_path}"]
        ),
        # What DeepSpeed itself cannot load (AssertionError, KeyError): the stage, read from the
        # policy file. The optimizer, precision and batch go through the same training identity
        # (tests/test_faults_units.py::test_resume_with_another_zero_stage_optimizer_precision_or_batch_is_refused).
        "zero_stage=2 there, 3 here": dict(ranks=2, args=[*data, "--zero=zero_configs/z3.json"]),
    }
    for marker, case in early.items():
        code, output = _run(["--train.steps=8", "--resume=auto", *case["args"]], data_cache, out, ranks=case["ranks"])
        assert code == 2, output[-3000:]
        _one_message(output, marker)
        assert "parameters per tower" not in output  # found before the towers were built

    # The same list file naming other shards: only the loader can tell, after the engine is built.
    shard_list.write_text("\n".join(scenes.train_shards[1:]))
    code, output = _run(["--train.steps=8", "--resume=auto", *data], data_cache, out)
    assert code == 2, output[-3000:]
    assert "the training shards or their settings changed" in _one_message(output, "cannot continue this run's data")

    policy = json.loads((REPO / "zero_configs" / "z2.json").read_text())
    policy["zero_optimization"]["overlap_comn"] = True  # a typo
    (tmp_path / "z2_typo.json").write_text(json.dumps(policy))
    code, output = _run(["--train.steps=8", "--resume=auto", f"--zero={tmp_path / 'z2_typo.json'}"], data_cache, out)
    assert code == 2, output[-3000:]
    assert "overlap_comn" in _one_message(output, "zero_optimization is not valid")


def _wait_pending(pid: int, sig: int, timeout: float) -> None:
    """Waits until ``sig`` is pending on the stopped process ``pid`` (ShdPnd/SigPnd of its /proc status)."""
    deadline = time.time() + timeout
    while True:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        if (int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)) & (1 << (sig - 1)):
            return
        assert time.time() < deadline, f"signal {sig} never reached process {pid} within {timeout} s"
        time.sleep(0.2)


# ---- 5. signals to the deepspeed command, its launcher, a rank --------------------------------


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in found]


# The user-facing command's exit status: DeepSpeed's own for signals to its processes (what each
# does is in launch/lifecycle/supervise.py), 75 through launch/lifecycle/supervise.py. A launcher answers SIGTERM and
# SIGINT by exiting 1 and dies of SIGUSR1, upon which the command reports 0 (it passes only
# positive codes on); the command dies of SIGTERM/SIGUSR1 and ends SIGINT with a KeyboardInterrupt.
@pytest.mark.parametrize(
    "target, sig, code",
    [
        ("command", signal.SIGTERM, -signal.SIGTERM),
        ("command", signal.SIGUSR1, -signal.SIGUSR1),
        ("command", signal.SIGINT, -signal.SIGINT),
        ("launcher", signal.SIGTERM, 1),
        ("launcher", signal.SIGUSR1, 0),
        ("launcher", signal.SIGINT, 1),
        ("rank", signal.SIGINT, 75),
        ("supervisor group", signal.SIGINT, 75),  # Ctrl-C in a terminal: the foreground group
        ("supervised command", signal.SIGTERM, 75),  # the chain above the ranks broken anyway
    ],
)
def test_a_signal_to_any_process_of_the_run_checkpoints_and_stops_every_rank(
    target: str, sig: signal.Signals, code: int, tmp_path: Path, data_cache: Path
) -> None:
    run = tmp_path / "runs" / "run"
    supervised = target.startswith("supervis")
    # One data worker per rank: a launcher terminates each rank's whole process tree.
    process = _start(
        ["--train.steps=400", "--data.num_workers=1"], data_cache, tmp_path / "runs", supervised=supervised
    )
    deadline = time.time() + 300
    while not [r for r in read_log(run) if r.get("step", 0) >= 2]:
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.2)
    (command,) = _children(process.pid) if supervised else [process.pid]
    (launcher,) = _children(command)
    ranks = _children(launcher)
    assert len(ranks) == 2
    if target == "supervisor group":
        os.killpg(process.pid, sig)  # the supervisor leads the group; the command has its own session
    else:
        pid = {"command": command, "supervised command": command, "launcher": launcher, "rank": ranks[0]}[target]
        os.kill(pid, sig)
    status, output = _finish(process, timeout=300)  # returns once every process holding the pipe is gone
    for pid in ranks:  # gone, or a zombie; a rank closes its output before its interpreter has quite exited
        _wait_gone(pid, timeout=60)
    stops = [r for r in read_log(run) if r.get("event") == "stopped"]
    assert len(stops) == 1, (status, [r for r in read_log(run) if "event" in r], output[-4000:])
    (stopped,) = stops
    assert stopped["exit_code"] == 75, output[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert int(latest.removeprefix("step")) == stopped["step"] < 400
    # No rank's traceback (the deepspeed command's own KeyboardInterrupt after Ctrl-C is DeepSpeed's).
    assert not re.search(r"\[rank\d\]: Traceback", output), output[-3000:]
    assert status == code, output[-3000:]


# ---- an evaluation that fails cannot lose the run ----------------------------------------------


def test_an_eval_set_with_labels_beyond_its_class_names_costs_no_training(tmp_path: Path, data_cache: Path) -> None:
    from test_eval_formats import clip_benchmark_sets

    cls, _ = clip_benchmark_sets(tmp_path / "sets", n=6)
    (cls / "classnames.txt").write_text("red\ngreen\n")  # its labels are 0, 1 and 2
    run = tmp_path / "runs" / "run"
    args = ["--train.steps=4", "--eval.every_steps=2", "--eval.at_end=true", f"--eval.sets=bad={cls}:zeroshot"]
    code, output = _run([*args, "--checkpoint.every_steps=0"], data_cache, tmp_path / "runs")
    assert code == 2, output[-3000:]
    line = _one_message(output, "tritower: error: evaluation failed")
    assert "at step(s) 2, 4" in line and "label 2 but only 2 class names" in line
    assert len([x for x in output.splitlines() if "evaluation at step" in x and "training goes on" in x]) == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["eval_failed"] == 2 and math.isfinite(metrics["loss"])
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000004"


# ---- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    """A 2 MiB tmpfs: a few of clip_test's checkpoints fill it. Mounting needs root (CI's
    containers and this machine run as root)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_says_disk_full_in_one_line_and_keeps_the_checkpoints(small_disk: Path, data_cache: Path) -> None:
    args = ["--train.steps=12", "--checkpoint.every_steps=1", "--checkpoint.keep_last=0"]
    code, output = _run(args, data_cache, small_disk)
    assert code == 2, output[-3000:]
    line = _one_message(output, "disk full (ENOSPC)")
    assert "--resume auto continues from the newest" in line
    checkpoints = small_disk / "run" / "checkpoints"
    for tag in _tags(checkpoints):  # every tag left is complete
        assert (checkpoints / f"step{tag:08d}" / "manifest.json").is_file()
    assert not list(checkpoints.glob("*.partial"))  # the failed save gave its space back

    with open(small_disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:  # whatever space is left, taken
            filler.write(b"\0" * 4096)
    code, output = _run([*args, "--resume=auto"], data_cache, small_disk)
    assert code == 2, output[-3000:]
    assert "cannot write to" in _one_message(output, "disk full (ENOSPC)")  # before any tower is built


# ---- a rank that hangs, a data worker killed ------------------------------------------------------


def _rank_pid(launcher: int, local_rank: int) -> int:
    (pid,) = [p for p in _children(launcher) if f"--local_rank={local_rank}" in Path(f"/proc/{p}/cmdline").read_text()]
    return pid


@pytest.mark.parametrize("fault", ["SIGSTOP a rank", "kill a data worker"])
def test_a_hung_rank_or_a_killed_data_worker_stops_every_rank_with_one_line(
    fault: str, tmp_path: Path, data_cache: Path
) -> None:
    run = tmp_path / "runs" / "run"
    # A killed worker is seen by its own rank; a short hang timeout would let rank 0's watchdog
    # name rank 1 first on a loaded machine, so that case waits longer.
    hang = 6 if fault == "SIGSTOP a rank" else 60
    args = ["--train.steps=400", f"--train.hang_timeout_s={hang}", "--checkpoint.every_steps=2", "--data.num_workers=1"]
    process = _start(args, data_cache, tmp_path / "runs")
    deadline = time.time() + 300
    while not [r for r in read_log(run) if r.get("step", 0) >= 3]:
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.2)
    (launcher,) = _children(process.pid)
    rank0, rank1 = _rank_pid(launcher, 0), _rank_pid(launcher, 1)
    if fault == "SIGSTOP a rank":
        os.kill(rank1, signal.SIGSTOP)
        _wait_gone(rank0, timeout=120)  # the watchdog of rank 0 saw rank 1's heartbeat stop
        _wait_pending(rank1, signal.SIGTERM, timeout=60)  # the launcher saw rank 0's exit status first
        for pid in [*_children(rank1), rank1]:  # what the launcher does 30 s after its SIGTERM, in its order
            os.kill(pid, signal.SIGKILL)
        marker, named = "made no progress for 6 s", "rank 1 made no progress"
    else:
        (worker,) = _children(rank1)
        os.kill(worker, signal.SIGKILL)  # as the out-of-memory killer does
        marker, named = "a data-loader worker died", "rank 1: a data-loader worker died"
    status, output = _finish(process, timeout=300)
    assert status == 75, output[-3000:]
    assert named in _one_message(output, marker)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "manifest.json").is_file()  # the newest checkpoint is intact


def test_a_collapsed_run_is_counted_and_warned_about(tmp_path: Path, data_cache: Path) -> None:
    """A logit scale of exp(-30): every logit 0, the loss ln 32 exactly, no NaN anywhere."""
    args = ["--train.steps=4", "--model.init_logit_scale=-30", "--train.collapse_warn_steps=2"]
    code, output = _run([*args, "--checkpoint.every_steps=2"], data_cache, tmp_path / "runs")
    assert code == 3, output[-3000:]  # it ended collapsed: not a finished run
    line = _one_message(output, "the loss has stayed at")
    assert "ln(batch) = 3.4657" in line and "for 2 steps" in line and "the last good one is none yet" in line
    assert "4 steps in a row (steps 1-4) at chance" in _one_message(output, "the run ended collapsed")
    run = tmp_path / "runs" / "run"
    assert not (run / "metrics.json").exists() and (run / "checkpoints" / "step00000002" / "suspect").is_file()
    losses = [r["loss"] for r in read_log(run) if "loss" in r]
    assert losses == pytest.approx([math.log(32)] * 4, abs=1e-5)
