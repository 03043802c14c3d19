"""The sbatch scripts' launch logic, run locally under a fake SLURM environment on 2 CPU ranks.

SLURM cannot run here, so ``tests/fake_slurm`` stands in for ``srun`` (start SLURM_NTASKS tasks
with their task variables) and ``scontrol`` (host list, requeue). Everything they start is real:
the scripts, ``launch/slurm/task.sh``, the trainer, DeepSpeed on gloo.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launching import REPO, Run, free_port

pytestmark = pytest.mark.launch

FAKE = REPO / "tests" / "fake_slurm"


def _job(
    script: str, tmp_path: Path, data_cache: Path, *overrides: str, job_id: int = 4242
) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "slurm.log"
    venv_bin = Path(os.sys.executable).parent
    env = dict(
        os.environ,
        PATH=f"{FAKE}:{venv_bin}:{os.environ['PATH']}",
        FAKE_SLURM_LOG=str(log),
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NAME="tritower",
        SLURM_JOB_NODELIST="127.0.0.1",
        SLURM_NNODES="1",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_CPUS_PER_TASK="1",
        SLURM_SUBMIT_DIR=str(REPO),
        MASTER_PORT=str(free_port()),
        RUN_NAME="slurmrun",
        ZERO="zero_configs/z2.json",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    args = [
        "bash",
        str(REPO / "launch" / "slurm" / script),
        "--experiment=clip_test",
        f"--data.cache_dir={data_cache}",
        f"--train.output_dir={tmp_path / 'runs'}",
        "--eval.at_end=false",
        "--train.log_every=1",
        *overrides,
    ]
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, log


def test_one_node_script_trains_to_the_end(tmp_path: Path, data_cache: Path) -> None:
    run = Run.before(tmp_path / "runs" / "slurmrun")
    process, log = _job("train_1node.sbatch", tmp_path, data_cache, "--train.steps=4")
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    assert "2 ranks, master 127.0.0.1" in output
    metrics = run.finished(output).metrics
    assert metrics["world_size"] == 2 and metrics["step"] == 4
    assert "requeue" not in log.read_text()


@pytest.mark.parametrize("script", ["train_multinode.sbatch"])
def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes(script: str, tmp_path: Path, data_cache: Path) -> None:
    process, log = _job(script, tmp_path, data_cache, "--train.steps=300")
    train_log = tmp_path / "runs" / "slurmrun" / "train_log.jsonl"
    deadline = time.time() + 300
    while not (train_log.exists() and train_log.read_text().count("\n") >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.2)
    tasks = [int(pid) for pid in log.read_text().split("tasks ")[1].split()]
    for pid in tasks:  # what --signal=USR1@T does: every task of the step gets the signal
        os.kill(pid, signal.SIGUSR1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert "requeue 4242" in log.read_text()
    latest = (tmp_path / "runs" / "slurmrun" / "checkpoints" / "latest").read_text().strip()
    stopped = int(latest.removeprefix("step"))

    # The requeued job runs the same script again and resumes by itself (--resume=auto).
    requeued = Run.before(tmp_path / "runs" / "slurmrun")
    process, log = _job(script, tmp_path, data_cache, f"--train.steps={stopped + 2}")
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    assert f"at step {stopped}" in output
    requeued.finished(output)
    assert [record["step"] for record in requeued.steps()] == [stopped + 1, stopped + 2]
    assert requeued.metrics["step"] == stopped + 2
