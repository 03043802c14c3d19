"""``python -m tritower.launch.plan``: the memory planner's command line (the model is
``planner.py``, the printed tables ``report.py``).

    python -m tritower.launch.plan --image vit_giant_patch14_224 --text bert_large \\
        --setting Uu --global-batch 32768 --gpus 256 --gpu-memory 80
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields

from tritower.launch.cli import parse_options
from tritower.launch.config import ConfigError
from tritower.launch.plan.planner import PlanRequest, plan, to_json
from tritower.launch.plan.report import format_plan


@dataclass(frozen=True)
class PlanOptions(PlanRequest):
    """Options of the memory planner: the request, and how to print the plan."""

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
        request = PlanRequest(**{f.name: getattr(options, f.name) for f in fields(PlanRequest)})
        result = plan(request)
    except (ConfigError, ValueError) as error:
        print(f"tritower.plan: error: {error}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(to_json(result), indent=1))
    else:
        print(format_plan(result))
    return 0
