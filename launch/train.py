"""Train a contrastive image-text model.

    deepspeed launch/train.py --zero zero_configs/z3.json                      # the default run
    deepspeed --num_gpus 2 launch/train.py --zero zero_configs/z3.json \\
        --experiment clip_tiny --optim.lr=5e-4 --data.batch_size=256            # 2 ranks

Options are ``--experiment NAME`` and ``--section.field=value`` overrides (see launch/config.py).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
import traceback

from tritower.data.embeddings import EmbeddingsError
from tritower.data.samples import DataQualityError
from tritower.launch.cli import load_config
from tritower.launch.config import ConfigError
from tritower.launch.engine.ds_config import build_ds_config
from tritower.launch.lifecycle.dist_env import check_master_port, from_environ
from tritower.launch.lifecycle.preemption import (
    CONFIG_EXIT_CODE,
    REQUEUE_EXIT_CODE,
    STOP_SIGNALS,
    Preempted,
    exit_rank,
    ignore_stop_signals,
    record_exit,
    say_setup_error,
)


def main(argv: list[str]) -> int:
    """Exit codes: 0 done, 2 configuration/input/run-folder/resume problem (one line says which
    and the fix), 3 diverged (non-finite losses; the message names the checkpoint to resume),
    75 stopped by a signal or a lost launcher after writing a checkpoint (requeue), by the hang
    watchdog or a killed data worker (requeue: the newest checkpoint resumes), 1 another rank's
    process ended (its own line says why) or a real bug (its traceback)."""
    env = from_environ()
    try:
        cfg = load_config(argv)
        from tritower.launch.experiments import DEFAULT_EXPERIMENT, get_experiment
        from tritower.launch.metrics.console import setup_console  # library noise off; say what the start costs

        setup_console(cfg, default=get_experiment(DEFAULT_EXPERIMENT))
        # Fill the ZeRO policy now, so a wrong JSON fails before data or towers are built.
        from tritower.launch.engine.ds_config import check_zero_policy

        check_zero_policy(build_ds_config(cfg, env.world_size), cfg.deepspeed.zero)
        check_master_port()
        from tritower.launch.engine.engine import meet_all_ranks
        from tritower.launch.loop.trainer import run

        run(cfg)
        meet_all_ranks()
    except Preempted as stop:
        ignore_stop_signals()  # exit 75 stays 75 whatever the scheduler sends the ranks now
        if stop.agreed:  # every rank stopped at the same step and wrote its part of the checkpoint
            meet_all_ranks()
        raise
    except ConfigError as error:
        leave_quietly_on_stop(CONFIG_EXIT_CODE)
        say_setup_error(env.rank, f"config error: {error}")
        return CONFIG_EXIT_CODE
    except (FileNotFoundError, PermissionError, EmbeddingsError, DataQualityError) as error:
        # Bad or missing input files: the message names the file and the fix; no traceback needed.
        leave_quietly_on_stop(CONFIG_EXIT_CODE)
        say_setup_error(env.rank, f"error: {own_message(error)}")
        return CONFIG_EXIT_CODE
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        text = str(error.strerror or "")
        if not text.startswith("disk full"):  # a plain write that met it (train_log.jsonl, config.yaml)
            text = (
                f"disk full (ENOSPC) while writing {error.filename or 'to the run folder'}: free space there or pass "
                "another --train.output_dir; every checkpoint written before is intact and --resume auto continues "
                "from the newest"
            )
        leave_quietly_on_stop(CONFIG_EXIT_CODE)
        say_setup_error(env.rank, f"error: {text}")
        return CONFIG_EXIT_CODE
    except RuntimeError as error:
        stop = stop_line(error, env.rank)
        if stop is None:
            raise
        leave_quietly_on_stop(stop[1])
        say_stop(env.rank, stop[0])
        return stop[1]
    return 0


def leave_quietly_on_stop(code: int) -> None:
    """From here on a stop signal ends this rank at once with ``code``, saying nothing: a rank that
    failed waits before its line, and the launcher's SIGTERM then means another rank failed too
    and has said so (inside the loop a signal would only set the checkpoint-and-stop flag)."""

    def leave(number: int, frame: object) -> None:
        record_exit(code)
        os._exit(code)

    for number in STOP_SIGNALS:
        signal.signal(number, leave)


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")
"""What gloo (and NCCL's socket layer) say when another rank's process has gone."""


def own_message(error: BaseException) -> str:
    """The error's own message: an exception re-raised from a data-loader worker carries the
    worker's whole traceback in its text ("Caught ... in DataLoader worker process 0. Original
    Traceback ..."); its last line is the message."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def stop_line(error: RuntimeError, rank: int) -> tuple[str, int] | None:
    """The one line and exit code of a rank that cannot go on for a reason outside it (None: a
    real bug, whose traceback is printed): another rank's process went away (its own line says
    why; exit code 1, below that rank's own 2, 3 or 75, which SLURM's srun reports as the highest),
    or one of this rank's data workers was killed (75: a requeue resumes from the newest checkpoint)."""
    text = str(error)
    if any(marker in text for marker in PEER_LOST):
        return (
            f"rank {rank}: lost the connection to another rank (its process ended; its own line above says why): "
            "stopping too. --resume auto continues from the newest checkpoint"
        ), 1
    if "DataLoader worker" in text and ("killed by signal" in text or "exited unexpectedly" in text):
        return (
            f"rank {rank}: a data-loader worker died ({text.splitlines()[0]}), e.g. killed by the out-of-memory "
            "killer: stopping; --resume auto continues from the newest checkpoint (lower data.num_workers if "
            "memory is short)"
        ), REQUEUE_EXIT_CODE
    return None


def say_stop(rank: int, line: str) -> None:
    """Print a stop line after a short wait: when another rank failed first, the launcher usually
    ends this one before then, and the job shows that rank's line alone."""
    time.sleep(STOP_LINE_DELAY_S)
    print(f"tritower: {line}", file=sys.stderr, flush=True)


STOP_LINE_DELAY_S = 3.0


if __name__ == "__main__":
    code = 1  # an uncaught exception: its traceback is printed as the interpreter would
    try:
        code = main(sys.argv[1:])
    except SystemExit as stop:  # Preempted (75), Diverged (3)
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:  # a second Ctrl-C
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
    record_exit(code)  # for launch/lifecycle/supervise.py, where the launchers lose it
    exit_rank(code)
