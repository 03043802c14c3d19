"""``python -m tritower.launch.plan``: the memory planner's command line (the model is
``planner.py``, the printed tables ``report.py``).

    python -m tritower.launch.plan --image vit_giant_patch14_224 --text bert_large \\
        --setting Uu --global-batch 32768 --gpus 256 --gpu-memory 80
"""

from __future__ import annotations

import argparse
import json
import sys

from tritower.launch.plan.planner import SETTINGS, PlanRequest, plan, to_json
from tritower.launch.plan.report import format_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tritower.launch.plan",
        description="Memory planner: per-GPU memory of a run, and the ZeRO stage, micro-batch and checkpointing "
        "that fit it into the GPUs.",
    )
    parser.add_argument("--image", required=True, help="image tower registry name")
    parser.add_argument("--text", required=True, help="text tower registry name")
    parser.add_argument("--setting", default="uu", choices=SETTINGS)
    parser.add_argument("--global-batch", type=int, required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--margin", type=float, default=0.10, help="fraction kept free")
    parser.add_argument("--embed-dim", type=int, default=1024)
    parser.add_argument("--third", default="", help="3T third tower (default: the image tower)")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--tile", type=int, default=1024, help="tiled loss tile size")
    parser.add_argument(
        "--precomputed-locked", action="store_true", help="locked towers' embeddings are precomputed (not on the GPU)"
    )
    parser.add_argument(
        "--unfused-attention", action="store_true", help="attention keeps its s x s probabilities (math kernel)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    options = parser.parse_args(argv)
    try:
        request = PlanRequest(
            options.image,
            options.text,
            options.setting,
            options.global_batch,
            options.gpus,
            options.gpu_memory,
            options.precision,
            options.gpus_per_node,
            options.margin,
            options.embed_dim,
            options.third,
            options.vocab_size,
            options.tile,
            options.precomputed_locked,
            not options.unfused_attention,
        )
        result = plan(request)
    except ValueError as error:
        print(f"tritower.plan: {error}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(to_json(result), indent=1))
    else:
        print(format_plan(result))
    return 0
