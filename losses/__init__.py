"""Contrastive losses (CLIP softmax, SigLIP sigmoid) with naive, tiled and Triton kernels.

``ContrastiveLoss.from_config(config.loss)`` is what the trainer builds; ``clip_loss`` and
``sigmoid_loss`` are the functional forms, and ``gather_with_grad`` lets several loss terms
(Three Towers) share one gather per tower. See ``docs/loss.md``.
"""

from .config import LossConfig
from .contrastive import ContrastiveLoss, NonFiniteInputError, check_finite, clip_loss, sigmoid_loss
from .distributed import average_value, gather_with_grad

__all__ = [
    "ContrastiveLoss",
    "LossConfig",
    "NonFiniteInputError",
    "average_value",
    "check_finite",
    "clip_loss",
    "gather_with_grad",
    "sigmoid_loss",
]
