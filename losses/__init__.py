"""Contrastive losses (CLIP softmax, SigLIP sigmoid) with naive, tiled and Triton kernels.

``build_objective(config.loss, three_towers=...)`` is what the trainer builds: an objective
from ``OBJECTIVES`` (CLIP, SigLIP, 3T) called as ``objective(outputs) -> {"loss": ..., terms}``
(``objectives.py``); ``clip_loss``, ``sigmoid_loss`` and ``three_towers_loss`` are the functional
forms.
See ``docs/loss.md``.
"""

from .config import LossConfig
from .contrastive import NonFiniteInputError, check_finite, clip_loss, sigmoid_loss
from .distributed import average_value, gather_with_grad
from .objectives import (
    OBJECTIVES,
    CLIPObjective,
    Objective,
    SigLIPObjective,
    ThreeTowersObjective,
    build_objective,
    objective_name,
)
from .three_towers import three_towers_loss

__all__ = [
    "CLIPObjective",
    "LossConfig",
    "NonFiniteInputError",
    "OBJECTIVES",
    "Objective",
    "SigLIPObjective",
    "ThreeTowersObjective",
    "build_objective",
    "objective_name",
    "average_value",
    "check_finite",
    "clip_loss",
    "gather_with_grad",
    "sigmoid_loss",
    "three_towers_loss",
]
