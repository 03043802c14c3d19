"""Train a contrastive image-text model.

    deepspeed launch/train.py --zero zero_configs/z3.json                      # the default run
    deepspeed --num_gpus 2 launch/train.py --zero zero_configs/z3.json \\
        --experiment clip_tiny --optim.lr=5e-4 --data.batch_size=256            # 2 ranks

Options are ``--experiment NAME`` and ``--section.field=value`` overrides (see launch/config.py).
"""

from __future__ import annotations

import sys

from tritower.data.embeddings import EmbeddingsError
from tritower.data.samples import DataQualityError
from tritower.launch.cli import load_config
from tritower.launch.config import ConfigError
from tritower.launch.dist_env import from_environ
from tritower.launch.ds_config import build_ds_config


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
        # Fill the ZeRO policy now, so a wrong JSON fails before data or towers are built.
        build_ds_config(cfg, from_environ().world_size)
        from tritower.launch.trainer import run

        run(cfg)
    except ConfigError as error:
        print(f"tritower: config error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, EmbeddingsError, DataQualityError) as error:
        # Bad or missing input files: the message names the file and the fix; no traceback needed.
        print(f"tritower: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
