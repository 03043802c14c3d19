"""Stop paths that must keep their exit code and say one line: a wandb whose service died (the
signal that preempts a run reaches it too), a rank that makes no progress (the hang watchdog),
two runs racing for one folder. Cheap processes, not full training launches, where that proves it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.launch

WANDB_DIES = """
import os, signal, sys
import psutil
from tritower.launch.experiments import get_experiment
from tritower.launch.preemption import REQUEUE_EXIT_CODE, exit_rank
from tritower.launch.run_io import WandbLogger

cfg = get_experiment("clip_test")
cfg.wandb.mode = "offline"
logger = WandbLogger(cfg, __import__("pathlib").Path(sys.argv[1]), enabled=True)
logger.log({"train/loss": 1.0}, 1)
for child in psutil.Process().children(recursive=True):  # wandb's service, as a SIGTERM to all would
    os.kill(child.pid, signal.SIGKILL)
logger.log({"train/loss": 2.0}, 2)
logger.finish({"preempted_at_step": 2})
exit_rank(REQUEUE_EXIT_CODE)
"""


def test_a_dead_wandb_service_cannot_change_the_exit_code(tmp_path: Path) -> None:
    env = dict(os.environ, WANDB_SILENT="true")
    env.pop("WANDB_MODE", None)
    done = subprocess.run(
        [sys.executable, "-c", WANDB_DIES, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 75, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    warnings = [line for line in output.splitlines() if "tritower: warning: wandb" in line]
    assert len(warnings) == 1 and "the run itself is unaffected" in warnings[0], output[-3000:]
