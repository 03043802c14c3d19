"""The sbatch scripts' launch logic, run locally under a fake SLURM allocation on 2 CPU ranks.

SLURM cannot run here, so ``tests/fake_slurm`` stands in for ``srun`` (places the step's tasks on
the allocation's nodes with the variables srun sets, forwards signals, ``--kill-on-bad-exit``)
and ``scontrol`` (hostlist expansion, requeue). The simulated nodes are named ``127.0.0.[1-2]``:
loopback addresses of this host, so the master address the script derives from the first node
name resolves as on a cluster. Everything they start is real: the scripts, ``launch/slurm/task.sh``,
the trainer, DeepSpeed on gloo.

Five launches in all: the one-node script to the end (the reference), the multi-node script
preempted on one node and its requeued job, and the multi-node script whose data worker on one
node is killed and its requeued job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launching import REPO, Run, free_port, losses_by_step, read_log

pytestmark = pytest.mark.launch

FAKE = REPO / "tests" / "fake_slurm"
STEPS = 12
JOB_ID = 4242


def _job(
    script: str, out: Path, data_cache: Path, *, nodes: int, tasks_per_node: int, run_name: str, extra: tuple = ()
) -> tuple[subprocess.Popen, Path]:
    """Run an sbatch script with bash as SLURM would inside an allocation of ``nodes`` nodes."""
    log = out / "slurm.log"
    venv_bin = Path(os.sys.executable).parent
    env = dict(
        os.environ,
        PATH=f"{FAKE}:{venv_bin}:{os.environ['PATH']}",
        FAKE_SLURM_LOG=str(log),
        SLURM_JOB_ID=str(JOB_ID),  # a requeued job keeps its id
        SLURM_JOB_NAME="tritower",
        SLURM_JOB_NODELIST="127.0.0.[1-2]" if nodes == 2 else "127.0.0.1",
        SLURM_NNODES=str(nodes),
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NTASKS=str(nodes * tasks_per_node),
        SLURM_NTASKS_PER_NODE=str(tasks_per_node),
        SLURM_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})",
        SLURM_CPUS_PER_TASK="1",
        SLURM_SUBMIT_DIR=str(REPO),
        MASTER_PORT=str(free_port()),
        RUN_NAME=run_name,
        ZERO="zero_configs/z2.json",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    args = [
        "bash",
        str(REPO / "launch" / "slurm" / script),
        "--experiment=clip_test",
        f"--data.cache_dir={data_cache}",
        f"--train.output_dir={out / 'runs'}",
        f"--train.steps={STEPS}",
        "--eval.at_end=false",
        "--train.log_every=1",
        "--data.num_workers=1",  # a preemption signals the data workers too
        *extra,
    ]
    process = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    return process, log


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a rank and its data workers)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [below for child in children for below in _tree(int(child))]


def _finish(process: subprocess.Popen, timeout: int = 400) -> str:
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
        raise AssertionError(f"the job ran past {timeout} s (killed); its output:\n{output[-6000:]}") from None


def _wait_for_step(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Until the run has logged ``step`` (AssertionError if the job ended or 300 s passed first)."""
    deadline = time.time() + 300
    while not [record for record in read_log(run_dir) if record.get("step", 0) >= step]:
        assert process.poll() is None and time.time() < deadline, _finish(process)[-3000:]
        time.sleep(0.1)


def _requeued(tmp_path: Path, data_cache: Path, run_dir: Path, job: dict) -> tuple[Run, str, Path]:
    """The requeued job: the same script, job id and run name, resuming by itself (--resume=auto)."""
    requeued = Run.before(run_dir)
    process, log = _job("train_multinode.sbatch", tmp_path, data_cache, **job)
    output = _finish(process)
    assert process.returncode == 0, output[-3000:]
    requeued.finished(output)
    return requeued, output, log


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> tuple[Run, int, Path]:
    """The one-node script (1 node x 2 tasks) trained to the end, uninterrupted."""
    out = tmp_path_factory.mktemp("one-node")
    run = Run.before(out / "runs" / "reference")
    process, log = _job("train_1node.sbatch", out, data_cache, nodes=1, tasks_per_node=2, run_name="reference")
    output = _finish(process)
    return run.finished(output), process.returncode, log


def test_one_node_script_trains_to_the_end(reference: tuple[Run, int, Path]) -> None:
    run, code, log = reference
    assert code == 0, run.output[-3000:]
    assert "1 node(s), 2 ranks, master 127.0.0.1" in run.output
    assert run.metrics["world_size"] == 2 and run.metrics["step"] == STEPS
    assert "requeue" not in log.read_text()


def test_preemption_on_one_node_checkpoints_every_rank_requeues_and_resumes_exactly(
    reference: tuple[Run, int, Path], tmp_path: Path, data_cache: Path
) -> None:
    assert reference[1] == 0, reference[0].output[-3000:]
    run_dir = tmp_path / "runs" / "slurmrun"
    job = dict(nodes=2, tasks_per_node=1, run_name="slurmrun")
    process, log = _job("train_multinode.sbatch", tmp_path, data_cache, **job)
    _wait_for_step(process, run_dir, 2)
    tasks = [line.split() for line in log.read_text().splitlines() if line.startswith("task ")]
    # task PID node NODEID NODENAME rank PROCID: one task on each simulated node.
    assert [(t[3], t[4], t[6]) for t in tasks] == [("0", "127.0.0.1", "0"), ("1", "127.0.0.2", "1")], tasks
    for task in tasks:
        if task[3] == "1":  # preemption of the second node only (not the master's)
            for pid in _tree(int(task[1])):  # SLURM signals every process of the step there
                os.kill(pid, signal.SIGTERM)
    output = _finish(process)
    assert process.returncode == 0, output[-3000:]
    assert "2 node(s), 2 ranks, master 127.0.0.1" in output
    assert f"requeue {JOB_ID}" in log.read_text(), output[-3000:]
    (stopped,) = [record for record in read_log(run_dir) if record.get("event") == "stopped"]
    assert stopped["exit_code"] == 75 and stopped["reason"] == "signal on another rank"  # rank 0 got none
    tag = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert int(tag.name.removeprefix("step")) == stopped["step"] < STEPS
    for rank in (0, 1):  # both ranks wrote their part (ZeRO-2 optimizer partitions)
        assert (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file(), sorted(tag.iterdir())

    requeued, output, log = _requeued(tmp_path, data_cache, run_dir, job)
    assert f"resumed from {tag} at step {stopped['step']}" in output
    assert [record["step"] for record in requeued.steps()] == list(range(stopped["step"] + 1, STEPS + 1))
    assert log.read_text().count("requeue") == 1
    # Preempted and requeued on 2 nodes x 1 task = uninterrupted on 1 node x 2 tasks, bit for bit.
    expected = {record["step"]: record["loss"] for record in reference[0].steps()}
    assert losses_by_step(run_dir) == expected


def test_a_data_worker_killed_on_one_node_requeues_the_job_and_it_resumes_exactly(
    reference: tuple[Run, int, Path], tmp_path: Path, data_cache: Path
) -> None:
    """A fault, not a preemption: the out-of-memory killer takes rank 1's data worker on the second
    node. That rank stops every rank with exit code 75, srun ends the step, the job requeues
    itself, and the requeued job resumes from the newest checkpoint to the reference's losses."""
    assert reference[1] == 0, reference[0].output[-3000:]
    run_dir = tmp_path / "runs" / "faultrun"
    job = dict(nodes=2, tasks_per_node=1, run_name="faultrun", extra=("--checkpoint.every_steps=2",))
    process, log = _job("train_multinode.sbatch", tmp_path, data_cache, **job)
    _wait_for_step(process, run_dir, 3)
    (task,) = [
        line.split() for line in log.read_text().splitlines() if line.startswith("task ") and line.split()[3] == "1"
    ]
    rank = int(task[1])  # task.sh execs python: the task is the rank itself; its data worker is its child
    (worker,) = [
        pid
        for pid in _tree(rank)[1:]
        if "launch/train.py" in Path(f"/proc/{pid}/cmdline").read_text()
        and int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == rank
    ]
    os.kill(worker, signal.SIGKILL)
    output = _finish(process)
    assert process.returncode == 0, output[-3000:]
    assert "rank 1: a data-loader worker died" in output, output[-3000:]
    assert f"requeue {JOB_ID}" in log.read_text(), output[-3000:]
    newest = (run_dir / "checkpoints" / "latest").read_text().strip()

    _, output, log = _requeued(tmp_path, data_cache, run_dir, job)
    assert f"resumed from {run_dir / 'checkpoints' / newest}" in output
    assert log.read_text().count("requeue") == 1
    expected = {record["step"]: record["loss"] for record in reference[0].steps()}
    assert losses_by_step(run_dir) == expected
