"""The memory planner (docs/memory_planner.md): ``planner.py`` (request, search, recommendation),
``states.py`` (model states per ZeRO policy), ``activations.py`` (activation memory),
``report.py`` (tables), ``measure.py`` (CPU measurements that check the model),
``command.py`` (``python -m tritower.launch.plan``).
"""

from tritower.launch.plan.command import main
from tritower.launch.plan.planner import PlanRequest, build_towers, head_parameters, plan, to_json

__all__ = ["PlanRequest", "build_towers", "head_parameters", "main", "plan", "to_json"]
