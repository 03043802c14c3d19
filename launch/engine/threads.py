"""Torch's compute threads per rank, chosen from the cores this process may use and the ranks that
share them.

DeepSpeed's launcher starts every local rank with torch's default thread count (all cores, unless
``--bind_cores_to_rank``), so two ranks on two cores run four compute threads that fight for two
cores; ``torchrun`` sets ``OMP_NUM_THREADS=1`` per process instead. A rank here takes
``cores // local ranks`` (at least 1), where ``cores`` is ``os.sched_getaffinity`` (what a SLURM
task or ``taskset`` left it, not the machine's count), unless the user chose: the config's
``train.threads_per_rank`` first, then ``OMP_NUM_THREADS`` (which DeepSpeed's
``--bind_cores_to_rank`` sets too). The start-up line says which rule decided.
"""

from __future__ import annotations

import os


def threads_per_rank(cores: int, local_ranks: int, omp_num_threads: str | None, configured: int) -> tuple[int, str]:
    """(threads, why): ``configured`` > 0 wins, then a valid ``OMP_NUM_THREADS``, else
    ``max(1, cores // local_ranks)``."""
    if configured > 0:
        return configured, "train.threads_per_rank"
    if omp_num_threads and omp_num_threads.strip().isdigit() and int(omp_num_threads) > 0:
        return int(omp_num_threads), "OMP_NUM_THREADS"
    ranks = max(1, local_ranks)
    return max(1, cores // ranks), f"{cores} core(s) / {ranks} local rank(s)"


def set_rank_threads(configured: int, local_ranks: int) -> str:
    """Sets torch's intra-op threads for this rank; returns the start-up line's phrase
    (``2 thread(s): 2 core(s) / 1 local rank(s)``)."""
    import torch

    cores = len(os.sched_getaffinity(0))
    threads, why = threads_per_rank(cores, local_ranks, os.environ.get("OMP_NUM_THREADS"), configured)
    torch.set_num_threads(threads)
    return f"{threads} thread(s): {why}"
