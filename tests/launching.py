"""Helpers for tests that start processes: free ports, ``deepspeed`` launches, and reading what a
training run wrote (``train_log.jsonl``, ``metrics.json``) instead of its human progress lines.

Tests import these explicitly (``from launching import ...``); fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"


def free_port() -> int:
    # Two launches in a row on one master port failed once with gloo "Broken pipe" on these machines.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_argv(script: Path, args: list[str], *, ranks: int, command: bool) -> list[str]:
    """``deepspeed --num_gpus ranks script args`` (``command``), or what that command starts on one
    node: ``python -u -m deepspeed.launcher.launch`` with the same world (see ``deepspeed_launch``);
    each on a free master port. The caller puts the working folder on PYTHONPATH, as the command does."""
    port = str(free_port())
    if command:
        deepspeed = Path(sys.executable).parent / "deepspeed"
        return [str(deepspeed), "--num_gpus", str(ranks), "--master_port", port, str(script), *args]
    from deepspeed.launcher.runner import encode_world_info  # the command's own encoding

    world = encode_world_info({"localhost": list(range(ranks))})
    launcher = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}"]
    return [*launcher, "--master_addr=127.0.0.1", f"--master_port={port}", str(script), *args]


def launch_env(cwd: Path, extra: dict | None = None) -> dict:
    """A launch's environment: this one, ``cwd`` on PYTHONPATH (as the ``deepspeed`` command sets
    it), one compute thread per rank, unbuffered output, no tokenizer threads; then ``extra``."""
    python_path = os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))
    base = {
        "PYTHONPATH": python_path,
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    return dict(os.environ, **base) | (extra or {})


def deepspeed_launch(
    script: Path,
    args: list[str],
    *,
    ranks: int,
    cwd: Path,
    timeout: int = 400,
    env: dict | None = None,
    command: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``script args`` on ``ranks`` CPU ranks under DeepSpeed's launcher and return its output.

    ``command=True`` types ``deepspeed --num_gpus ranks script args`` as a user does. Otherwise the
    launch starts what that command starts on one node, ``python -u -m deepspeed.launcher.launch``
    with the same world, master address and PYTHONPATH: the same ranks and environment, ~2.3 s
    cheaper a launch (13.5 s vs 11.1 s median for a 4-step 2-rank run, 5 timed runs each), which is
    minutes over the suite's launches. The command itself is exercised by the default run, the
    fault, resume, sweep and SLURM tests. ``env`` adds to (a value of None: removes from) the
    environment, which sets ``OMP_NUM_THREADS=1`` unless told otherwise."""
    if Path(script) == TRAIN and not any(arg.startswith("--log.curves") for arg in args):
        # Drawing curves.png costs a run about a second at its end; only the test of it asks for it.
        args = [*args, "--log.curves=False"]
    argv = launcher_argv(script, args, ranks=ranks, command=command)
    env = launch_env(
        cwd, {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true", **(env or {})}
    )
    env = {key: value for key, value in env.items() if value is not None}  # None: unset it
    # Its own session: a launch that runs past its timeout (or a Ctrl-C of pytest) is killed whole,
    # launcher and ranks, not left training on cores that other launches share.
    process = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException as error:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        if isinstance(error, subprocess.TimeoutExpired):
            raise AssertionError(
                f"launch timed out after {timeout} s (killed): {' '.join(argv)}\n{(stdout + stderr)[-6000:]}"
            ) from None
        raise
    result = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-6000:]
        raise AssertionError(f"launch failed ({result.returncode}): {' '.join(argv)}\n{tail}")
    return result


# ---- what a run writes ----------------------------------------------------------------------


def read_log(run_dir: Path) -> list[dict]:
    """Every record of ``run_dir/train_log.jsonl`` (all launches of the run, in order); a last line
    still being written by a live run is left out."""
    path = Path(run_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return records


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Step -> loss over all launches of the run; a step logged again after a resume: the later record wins."""
    return {record["step"]: record["loss"] for record in read_log(run_dir) if "loss" in record}


def _option(args: list[str], key: str) -> str | None:
    """The last value given to ``--key`` in ``--key=value`` or ``--key value`` form (later ones win)."""
    value = None
    for i, token in enumerate(args):
        if token.startswith(f"--{key}="):
            value = token.split("=", 1)[1]
        elif token == f"--{key}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def run_dir_of(args: list[str], env: dict | None = None) -> Path:
    """Where ``launch/train.py args`` writes: ``train.output_dir`` / (``train.run_name``, else the
    experiment, suffixed ``-$WANDB_RUN_ID`` under a sweep agent); see ``trainer.run_name``."""
    env = os.environ if env is None else env
    output_dir = Path(_option(args, "train.output_dir") or "runs")
    if not output_dir.is_absolute():
        output_dir = REPO / output_dir
    name = _option(args, "train.run_name")
    if not name:
        experiment = _option(args, "experiment") or "clip_tiny"
        name = f"{experiment}-{env['WANDB_RUN_ID']}" if env.get("WANDB_RUN_ID") else experiment
    return output_dir / name


def _stamp(path: Path) -> tuple[int, int] | None:
    """Which version of a file is there (the trainer replaces metrics.json atomically: a new inode)."""
    if not path.exists():
        return None
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


@dataclass
class Run:
    """One launch of a training run: its console ``output`` (for message checks) and what it wrote
    in ``run_dir``. Make it with ``Run.before(run_dir)`` *before* launching, then
    ``run.finished(output)`` once the launch is over: ``log`` and ``metrics`` are then this
    launch's own, not those of an earlier launch of the same run (a resume appends to
    ``train_log.jsonl``) nor of a later one."""

    run_dir: Path
    output: str = ""
    log_start: int = 0  # records in train_log.jsonl before this launch
    log_end: int | None = None  # ... and after it (None: still running)
    metrics_before: tuple[int, int] | None = field(default=None, repr=False)
    written_metrics: dict | None = field(default=None, repr=False)

    @classmethod
    def before(cls, run_dir: Path) -> Run:
        run_dir = Path(run_dir)
        return cls(run_dir, log_start=len(read_log(run_dir)), metrics_before=_stamp(run_dir / "metrics.json"))

    def finished(self, output: str) -> Run:
        self.output = output
        self.log_end = len(read_log(self.run_dir))
        path = self.run_dir / "metrics.json"
        if _stamp(path) not in (None, self.metrics_before):
            self.written_metrics = json.loads(path.read_text())
        return self

    @property
    def log(self) -> list[dict]:
        """The train_log.jsonl records this launch wrote: per-step records and events."""
        return read_log(self.run_dir)[self.log_start : self.log_end]

    def steps(self) -> list[dict]:
        """This launch's per-step records (those with a ``loss``), in order."""
        return [record for record in self.log if "loss" in record]

    def losses(self) -> list[float]:
        return [record["loss"] for record in self.steps()]

    def events(self) -> list[dict]:
        return [record for record in self.log if "event" in record]

    @property
    def metrics(self) -> dict:
        """The final metrics this launch wrote (``metrics.json``); an error if it wrote none."""
        assert self.written_metrics is not None, (
            f"this launch wrote no {self.run_dir / 'metrics.json'}:\n{self.output[-3000:]}"
        )
        return self.written_metrics


def launch_train(
    args: list[str], *, ranks: int, timeout: int = 400, env: dict | None = None, command: bool = False
) -> Run:
    """``launch/train.py args`` on ``ranks`` CPU ranks under DeepSpeed's launcher (``command``: through
    the ``deepspeed`` command, see ``deepspeed_launch``); a failed launch raises AssertionError."""
    run = Run.before(run_dir_of(args, env=None if env is None else {**os.environ, **env}))
    result = deepspeed_launch(TRAIN, args, ranks=ranks, cwd=REPO, timeout=timeout, env=env, command=command)
    return run.finished(result.stdout + result.stderr)
