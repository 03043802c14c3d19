"""Shared fixtures: real ``deepspeed`` launches on CPU ranks (gloo), each on its own free port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"


def free_port() -> int:
    # Two launches in a row on one master port can fail with gloo "Broken pipe" (FACTS).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def deepspeed_launch(script: Path, args: list[str], *, ranks: int, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    """Run ``deepspeed --num_gpus ranks script args`` the way a user does, and return its output."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(free_port()), str(script), *args]
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), WANDB_SILENT="true",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-6000:]
        raise AssertionError(f"launch failed ({result.returncode}): {' '.join(command)}\n{tail}")
    return result


def final_metrics(output: str) -> dict:
    """The one JSON line the trainer prints at the end."""
    lines = [line for line in output.splitlines() if line.startswith("{") and '"experiment"' in line]
    assert lines, f"no final metrics line in output:\n{output[-3000:]}"
    return json.loads(lines[-1])


def losses_logged(output: str) -> list[float]:
    return [float(line.split("| loss ")[1].split()[0]) for line in output.splitlines() if line.startswith("step ") and "| loss " in line]


@pytest.fixture(autouse=True)
def remove_leftover_shm_buffers():
    """A rank killed by a test cannot unlink its DeepSpeed CPU all-reduce buffer (RAM in /dev/shm)."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    yield
    for path in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One built-in data cache for the whole session: scenes are generated once, then reused."""
    return tmp_path_factory.mktemp("tritower-cache")


@pytest.fixture
def train(tmp_path: Path, data_cache: Path):
    """Launch ``launch/train.py`` on N CPU ranks with test-sized defaults; returns its output."""

    def run(*overrides: str, ranks: int = 2, zero: str = "zero_configs/z3.json", experiment: str = "clip_test") -> str:
        args = ["--zero", zero, "--experiment", experiment, f"--data.cache_dir={data_cache}",
                f"--train.output_dir={tmp_path / 'runs'}", *overrides]
        result = deepspeed_launch(TRAIN, args, ranks=ranks, cwd=REPO)
        return result.stdout + result.stderr

    return run
