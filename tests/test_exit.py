"""How a rank ends: ``exit_rank`` keeps the exit code, the atexit handlers and the console output,
and a setup error is printed once per job, by whichever rank can say it.

Two real gloo ranks (plain processes, a TCP store) each hold a data loader whose worker ignores
SIGTERM (as the trainer's do), register an atexit handler, print without a newline and leave
through ``exit_rank``: the code each returns, the handlers' files and the unflushed text are what
the trainer's launcher and ``launch/lifecycle/supervise.py`` depend on, and neither may hang on its worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from launching import free_port

RANK = """
import atexit, sys
from pathlib import Path
import torch
import torch.distributed as dist
from tritower.data.workers import outlive_sigterm
from tritower.launch.lifecycle.preemption import exit_rank

rank, folder, code = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo", rank=rank, world_size=2)
dist.all_reduce(torch.ones(3))
loader = torch.utils.data.DataLoader(list(range(64)), num_workers=1, worker_init_fn=outlive_sigterm)
batches = iter(loader)
next(batches)  # a live worker at exit: multiprocessing's handler alone would wait for it forever
atexit.register(lambda: (folder / f"atexit{rank}").write_text("ran"))
print(f"rank {rank} unflushed", end="")
exit_rank(code)
print("not reached")
"""


@pytest.mark.launch
def test_exit_rank_keeps_code_handlers_and_output(tmp_path: Path) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(rank), str(tmp_path), str(code)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, code in ((0, 2), (1, 75))
    ]
    results = [(rank.wait(timeout=60), rank.stdout.read(), rank.stderr.read()) for rank in ranks]
    for rank, (code, out, err) in enumerate(results):
        assert code == (2, 75)[rank], err
        assert out == f"rank {rank} unflushed", err
        assert (tmp_path / f"atexit{rank}").read_text() == "ran"


def test_a_setup_error_is_said_by_rank_0_at_once_and_by_another_rank_after_a_wait(capsys, monkeypatch) -> None:
    from tritower.launch.lifecycle import preemption

    waits = []
    monkeypatch.setattr(preemption.time, "sleep", waits.append)
    preemption.say_setup_error(0, "config error: bad")
    assert capsys.readouterr().err == "tritower: config error: bad\n" and waits == []
    preemption.say_setup_error(3, "error: /data/x.tar is missing")
    assert capsys.readouterr().err == "tritower: rank 3: error: /data/x.tar is missing\n"
    assert waits == [preemption.RANK_MESSAGE_DELAY_S]  # rank 0's line first; the launcher ends this rank
