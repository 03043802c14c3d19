"""Stop paths that must keep their exit code and say one line: a wandb whose service died (the
signal that preempts a run reaches it too), a rank that makes no progress (the hang watchdog),
two runs racing for one folder. Cheap processes, not full training launches, where that proves it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tritower.data.samples import DataQualityError
from tritower.launch.train import own_message, stop_line

pytestmark = pytest.mark.launch

WANDB_DIES = """
import os, signal, sys
import psutil
from tritower.launch.experiments import get_experiment
from tritower.launch.lifecycle.preemption import REQUEUE_EXIT_CODE, exit_rank
from tritower.launch.metrics.wandb_logger import WandbLogger

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


# ---- errors met through other processes: one line, not their traceback -------------------------


class _BadData(torch.utils.data.IterableDataset):
    def __iter__(self):  # noqa: ANN204
        raise DataQualityError("data.max_bad_fraction=0.1 exceeded: 9 of 10 samples unreadable (corrupt: 9)")


def test_a_data_workers_error_is_said_without_the_workers_traceback() -> None:
    """torch re-raises a worker's exception in the rank with the worker's whole traceback in its
    text: the rank's line keeps the message only."""
    loader = torch.utils.data.DataLoader(_BadData(), batch_size=None, num_workers=1)
    with pytest.raises(DataQualityError) as error:
        next(iter(loader))
    assert "Original Traceback" in str(error.value)  # what the line used to print, 17 lines of it
    assert own_message(error.value) == "data.max_bad_fraction=0.1 exceeded: 9 of 10 samples unreadable (corrupt: 9)"


def _rank(rank: int, port: int, errors: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    dist.barrier()
    if rank == 1:
        os._exit(2)  # a rank that met a bad input and said so
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as error:
        errors["line"] = stop_line(error, rank)
    os._exit(0)


def test_a_rank_whose_peer_is_gone_says_one_line_not_gloos_traceback() -> None:
    """The real gloo error of a collective whose peer process ended becomes one line, exit code 1
    (below the peer's own 2, 3 or 75, which srun reports as the highest)."""
    from launching import free_port

    with torch.multiprocessing.Manager() as manager:
        errors = manager.dict()
        context = torch.multiprocessing.spawn(_rank, args=(free_port(), errors), nprocs=2, join=False)
        for process in context.processes:
            process.join(120)
        line, code = errors["line"]
    assert line.startswith("rank 0: lost the connection to another rank") and code == 1


# ---- two runs racing for one folder at the same instant --------------------------------------


def _take_lock(run_dir: str, start: object, results: object) -> None:
    from tritower.launch.lifecycle.run_lock import RunLock

    start.wait()  # every contender released at once
    try:
        RunLock(Path(run_dir)).acquire()
        results.put(("took", os.getpid()))
    except RuntimeError as error:
        results.put(("refused", str(error)))
    start.wait()  # hold the lock until every contender has tried


@pytest.mark.parametrize("left_by", ["nobody", "a killed run"])
@pytest.mark.parametrize("round", range(4))  # a race: one round of 4 lost it 1 time in 2 to 4
def test_two_runs_starting_in_one_folder_at_the_same_instant_get_one_lock(
    tmp_path: Path, round: int, left_by: str
) -> None:
    """Contenders released at one instant into a fresh folder, or into one whose lock a killed run
    left (each finds it stale and takes it over): exactly one takes the lock."""
    import multiprocessing

    if left_by == "a killed run":
        dead = subprocess.Popen(["true"])
        dead.wait()
        lock = {"pid": dead.pid, "host": socket.gethostname(), "start": "1", "slurm_job": "", "since": "then"}
        (tmp_path / "lock").write_text(json.dumps(lock))
    context = multiprocessing.get_context("fork")  # the contenders only take a file lock
    contenders = 4
    start, results = context.Barrier(contenders), context.Queue()
    processes = [context.Process(target=_take_lock, args=(str(tmp_path), start, results)) for _ in range(contenders)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(60)
    took = [detail for outcome, detail in outcomes if outcome == "took"]
    refused = [detail for outcome, detail in outcomes if outcome == "refused"]
    assert len(took) == 1 and len(refused) == contenders - 1, outcomes
    assert all(f"is in use by another run (pid {took[0]}" in line for line in refused), refused
