"""Compute threads per rank (``launch/engine/threads.py``): the cores a process may use shared by
the ranks on its node, unless the config or ``OMP_NUM_THREADS`` chose. Expected values are the
rule written out by hand; one launch checks that a real 2-rank DeepSpeed run on this machine's
cores says and uses the shared count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from launching import REPO, TRAIN, deepspeed_launch

from tritower.launch.engine.threads import threads_per_rank


@pytest.mark.parametrize(
    ("cores", "ranks", "omp", "configured", "expected"),
    [
        (2, 2, None, 0, 1),  # the 2-core machine, 2 ranks: one thread each, not four in all
        (2, 1, None, 0, 2),
        (16, 3, None, 0, 5),  # rounds down: 15 threads on 16 cores, never 18
        (2, 4, None, 0, 1),  # more ranks than cores: at least one thread
        (8, 0, None, 0, 8),  # no launcher variable: one rank
        (16, 2, "3", 0, 3),  # the user's OMP_NUM_THREADS
        (16, 2, "3", 6, 6),  # the config field wins over the environment
        (16, 2, "", 0, 8),  # empty or invalid OMP_NUM_THREADS is not a choice
        (16, 2, "four", 0, 8),
        (16, 2, "0", 0, 8),
    ],
)
def test_threads_per_rank(cores: int, ranks: int, omp: str | None, configured: int, expected: int) -> None:
    threads, why = threads_per_rank(cores, ranks, omp, configured)
    assert threads == expected
    if configured:
        assert why == "train.threads_per_rank"
    elif omp == "3":
        assert why == "OMP_NUM_THREADS"
    else:
        assert why == f"{cores} core(s) / {max(1, ranks)} local rank(s)"


@pytest.mark.launch
def test_two_ranks_share_the_cores(tmp_path: Path) -> None:
    """Without OMP_NUM_THREADS, each of 2 ranks under DeepSpeed's launcher takes its share."""
    args = ["--experiment", "clip_test", "--train.steps=4", f"--train.output_dir={tmp_path}", "--log.curves=False"]
    args += ["--checkpoint.save_at_end=False", "--zero", str(REPO / "zero_configs" / "z1.json")]
    result = deepspeed_launch(TRAIN, args, ranks=2, cwd=tmp_path, env={"OMP_NUM_THREADS": None})
    assert result.returncode == 0, result.stderr[-3000:]
    cores = len(os.sched_getaffinity(0))
    expected = f"({max(1, cores // 2)} thread(s): {cores} core(s) / 2 local rank(s))"
    assert expected in result.stdout, result.stdout[-3000:]
