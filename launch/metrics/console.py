"""What a run's console shows besides the project's own lines: library noise filtered, and a line
for each wait a user would otherwise sit through in silence.

``setup_console(cfg)`` runs on every rank right after the config is loaded (``launch/train.py``),
before DeepSpeed is imported:

* drops library messages that tell a user nothing: torch's ``FutureWarning`` that
  ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` are deprecated (DeepSpeed's ZeRO calls
  them every step), DeepSpeed's
  "Attempting to get learning rate from scheduler before it has started" (from a policy's own
  scheduler, should one be built) and "Setting accelerator to CPU ... unable to detect it"
  (the run's ``kernels:`` line names the device);
* announces, in one line, the first-run JIT compilation of DeepSpeed's CPU ops (about a minute);
* sets the rank's torch compute threads (``launch/engine/threads.py``: cores / local ranks unless
  the user chose) and prints them with the machine's matrix-multiply rate, the number every time
  in the README is quoted with.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

from tritower.launch.config import TrainConfig
from tritower.launch.engine.threads import set_rank_threads
from tritower.launch.lifecycle import dist_env

# Substrings of DeepSpeed log records that are dropped.
DEEPSPEED_NOISE = (
    "Attempting to get learning rate from scheduler before it has started",
    "unable to detect it",
    # torch's extension builder, imported by DeepSpeed's op builders on a CPU-only machine.
    "No CUDA runtime is found",
)
# The reference machine of the README's times (docs/default_run.md): a 1024x1024 float32 matmul at
# 100 GFLOP/s on 2 cores, where the default run trained in 585 s (measured 2026-12-02).
REFERENCE_GFLOPS = 100.0
REFERENCE_DEFAULT_TRAIN_S = 585.0


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in DEEPSPEED_NOISE)


def quiet_libraries() -> None:
    """Filter the library warnings and log records that say nothing to a user (idempotent)."""
    # torch renamed the collectives ZeRO calls every step (reduce_scatter_tensor, all_gather_into_tensor):
    # DeepSpeed's business, not the user's.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # The same logger objects the libraries configure on import: a filter set now stays.
    for name in ("DeepSpeed", "torch.utils.cpp_extension"):
        library_logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in library_logger.filters):
            library_logger.addFilter(_DropMessages())


def cpu_ops_to_compile() -> list[str]:
    """DeepSpeed ops this CPU run will JIT-compile because torch's extension cache lacks them."""
    import torch

    if torch.cuda.is_available():
        return []
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:  # a private helper; without it, say nothing rather than guess
        return []
    missing = []
    for name in ("deepspeed_shm_comm",):
        folder = _get_build_directory(name, verbose=False)
        if not any(entry.endswith(".so") for entry in (os.listdir(folder) if os.path.isdir(folder) else [])):
            missing.append(name)
    return missing


def matmul_gflops(size: int = 1024, repeats: int = 3) -> float:
    """This process's float32 matrix-multiply rate in GFLOP/s (a 1024x1024 product, best of a few:
    about 0.1 s on 2 cores, so rank 0 reaches the process group's start barely later)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def is_default_run(cfg: TrainConfig, default: TrainConfig | None) -> bool:
    """True for the README's default job: the default experiment (``default``, as the README runs
    it) with its own towers, steps, batch and built-in data, what the reference time was measured
    on; any other run gets no estimate."""
    if default is None or cfg.experiment != default.experiment:
        return False

    def cost(c: TrainConfig) -> tuple:
        return (c.model, c.train.steps, c.data.batch_size, c.data.uses_builtin, c.data.embeddings, c.eval.every_steps)

    return cost(cfg) == cost(default)


def speed_line(cfg: TrainConfig, gflops: float, threads: str, default: TrainConfig | None = None) -> str:
    """The start-of-run line with the machine's rate (``threads``: how many, and why), and for the
    default run (``default``: the default experiment's config) its expected time."""
    line = f"tritower: this rank multiplies float32 matrices at {gflops:.0f} GFLOP/s ({threads})"
    if is_default_run(cfg, default):
        estimate = REFERENCE_DEFAULT_TRAIN_S * REFERENCE_GFLOPS / max(gflops, 1e-3)
        line += (
            f"; the default run trained in {REFERENCE_DEFAULT_TRAIN_S / 60:.1f} min at {REFERENCE_GFLOPS:.0f} GFLOP/s "
            f"on the 2-core reference machine: about {estimate / 60:.0f} min here (docs/default_run.md)"
        )
    return line


def setup_console(cfg: TrainConfig, default: TrainConfig | None = None) -> None:
    """Quiet the libraries and set the rank's compute threads on every rank; on global rank 0, say
    what the start will cost (``default``: the default experiment's config, for its time estimate)."""
    quiet_libraries()
    env = dist_env.from_environ()
    threads = set_rank_threads(cfg.train.threads_per_rank, env.local_world_size)
    if not env.is_main:
        return
    print(speed_line(cfg, matmul_gflops(), threads, default), flush=True)
    missing = cpu_ops_to_compile()
    if missing:
        print(
            f"tritower: first run on this machine: DeepSpeed compiles its CPU op(s) {', '.join(missing)} "
            "with g++ now (about 1-2 minutes, once; cached in ~/.cache/torch_extensions)",
            flush=True,
        )
