"""Train a contrastive image-text model.

    deepspeed launch/train.py --zero zero_configs/z3.json                      # the default run
    deepspeed --num_gpus 2 launch/train.py --zero zero_configs/z3.json \\
        --experiment clip_tiny --optim.lr=5e-4 --data.batch_size=256            # 2 ranks

Options are ``--experiment NAME`` and ``--section.field=value`` overrides (see launch/config.py).
"""

from __future__ import annotations

import sys
import traceback

from tritower.data.embeddings import EmbeddingsError
from tritower.data.samples import DataQualityError
from tritower.launch.cli import load_config
from tritower.launch.config import ConfigError
from tritower.launch.engine.ds_config import build_ds_config
from tritower.launch.lifecycle.dist_env import check_master_port, from_environ
from tritower.launch.lifecycle.preemption import (
    CONFIG_EXIT_CODE,
    Preempted,
    exit_rank,
    ignore_stop_signals,
    record_exit,
    say_setup_error,
)


def main(argv: list[str]) -> int:
    """Exit codes: 0 done, 2 configuration/input/run-folder/resume problem (one line says which
    and the fix), 3 diverged (non-finite losses; the message names the checkpoint to resume),
    75 stopped by a signal or a lost launcher after writing a checkpoint (requeue)."""
    env = from_environ()
    try:
        cfg = load_config(argv)
        from tritower.launch.metrics.console import setup_console  # library noise off; say what the start costs

        setup_console(cfg)
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
        say_setup_error(env.rank, f"config error: {error}")
        return CONFIG_EXIT_CODE
    except (FileNotFoundError, PermissionError, EmbeddingsError, DataQualityError) as error:
        # Bad or missing input files: the message names the file and the fix; no traceback needed.
        say_setup_error(env.rank, f"error: {error}")
        return CONFIG_EXIT_CODE
    return 0


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
