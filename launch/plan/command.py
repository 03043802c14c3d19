"""``python -m tritower.launch.plan``: the memory planner's command line (the model is
``planner.py``, the printed tables ``report.py``).

    python -m tritower.launch.plan --image vit_giant_patch14_224 --text bert_large \\
        --setting Uu --global-batch 32768 --gpus 256 --gpu-memory 80
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from tritower.launch.cli import parse_options
from tritower.launch.config import ConfigError
from tritower.launch.plan.planner import SETTINGS, PlanRequest, plan, to_json
from tritower.launch.plan.report import format_plan


@dataclass
class PlanOptions:
    """Options of the memory planner: the towers, the setting, the batch and the GPUs."""

    image: str
    """Image tower registry name."""
    text: str
    """Text tower registry name."""
    global_batch: int
    """Samples per optimizer step over all GPUs (the contrastive batch)."""
    gpus: int
    """GPUs in the run."""
    gpu_memory: float
    """Memory per GPU, GiB."""
    setting: str = field(default="uu", metadata={"choices": SETTINGS})
    """LiT setting (image letter, text letter: L locked, U pretrained-unlocked, u from scratch) or 3T."""
    gpus_per_node: int = 8
    """GPUs per node: the nodes of DeepSpeed's own estimate (its host-memory figures)."""
    precision: str = field(default="bf16", metadata={"choices": ("bf16", "fp16", "fp32")})
    """Training precision."""
    margin: float = 0.10
    """Fraction of GPU memory kept free: CUDA context, allocator fragmentation, NCCL buffers."""
    embed_dim: int = 1024
    """Width of the shared embedding space."""
    third: str = ""
    """3T's third tower; "": the image tower's architecture."""
    vocab_size: int | None = None
    """Token table rows of the text tower; None: the registry tower's default vocabulary."""
    tile: int = 1024
    """Tile size of the tiled contrastive loss."""
    precomputed_locked: bool = False
    """Locked towers' embeddings are precomputed: no locked parameters or forward on the GPU."""
    unfused_attention: bool = False
    """Attention keeps its s x s probabilities (the math kernel) instead of a fused kernel."""
    json: bool = False
    """Print JSON instead of tables."""


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 planned, 2 a usage error or a request the planner refuses (one line)."""
    try:
        options = parse_options(
            PlanOptions,
            argv,
            command="python -m tritower.launch.plan",
            example="--image vit_giant_patch14_224 --text bert_large --setting Uu --global-batch 32768 "
            "--gpus 256 --gpu-memory 80",
        )
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
    except (ConfigError, ValueError) as error:
        print(f"tritower.plan: error: {error}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(to_json(result), indent=1))
    else:
        print(format_plan(result))
    return 0
