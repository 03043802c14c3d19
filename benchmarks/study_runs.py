"""How the study trains its runs and towers: one after another in this process, or ``jobs`` at
once, each in a spawned process of its own (``benchmarks/study.py --jobs``). A result on disk is
a finished run, so an interrupted study resumes where it stopped."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from tritower.benchmarks.study_towers import prepare_tower

if TYPE_CHECKING:
    from tritower.benchmarks.study import Budget, Run


def run_all(
    runs: list[Run],
    out: Path,
    started: float,
    label: str,
    train: Callable[[Run], dict],
    jobs: int = 1,
    threads: int = 1,
) -> list[dict]:
    """Train (``train``, picklable when ``jobs`` > 1) each run that has no result yet, saying which;
    returns every run's result. A result on disk is a finished run: an interrupted study resumes
    where it stopped. ``jobs`` > 1 trains that many runs at once, each in a process of its own with
    ``threads`` torch threads (the runs are small: two one-thread processes on two cores train
    about twice what one two-thread process does)."""
    todo = [(index, run) for index, run in enumerate(runs) if not (out / "results" / f"{run.key}.json").exists()]
    announce = functools.partial(_announce_and_train, train, label, len(runs), started)
    if jobs <= 1:
        for index, run in todo:
            announce(index, run)
    else:
        with _pool(jobs, threads) as pool:
            for future in [pool.submit(announce, index, run) for index, run in todo]:
                future.result()  # the first failure stops the study with its own traceback
    return [json.loads((out / "results" / f"{r.key}.json").read_text()) for r in runs]


def _announce_and_train(
    train: Callable[[Run], dict], label: str, total: int, started: float, index: int, run: Run
) -> dict:
    print(f"{label}: run {index + 1}/{total} {run.key} ({time.time() - started:.0f} s so far)", flush=True)
    return train(run)


def _pool(jobs: int, threads: int) -> ProcessPoolExecutor:
    """``jobs`` fresh processes (spawned: no state of this one's torch or process group), each on
    ``threads`` threads and its own master port (``launch/train.py``'s single-process default)."""
    return ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=set_threads, initargs=(threads,)
    )


def set_threads(threads: int) -> None:
    """This process's runs on ``threads`` compute threads. The trainer sets a rank's threads from
    ``OMP_NUM_THREADS`` (``train.threads_per_rank``'s default), else from the cores, which would
    put two threads of each of ``jobs`` processes on every core. On a machine shared with other
    jobs one thread per process avoids stalls at every parallel region's barrier while a sibling
    thread waits for a core (~3x here, loaded)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def prepare_towers(
    kinds: list[str], out: Path, budget: Budget, cache: Path, styles: str, jobs: int, threads: int
) -> dict[str, dict]:
    """``prepare_tower`` of each kind, ``jobs`` at once (as ``run_all``)."""
    if jobs <= 1 or len(kinds) < 2:
        return {kind: prepare_tower(kind, out, budget, cache, styles=styles) for kind in kinds}
    with _pool(min(jobs, len(kinds)), threads) as pool:
        futures = {kind: pool.submit(prepare_tower, kind, out, budget, cache, styles) for kind in kinds}
        return {kind: future.result() for kind, future in futures.items()}
