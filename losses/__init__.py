"""Contrastive losses (CLIP softmax, SigLIP sigmoid) with naive, tiled and Triton kernels.

``ContrastiveLoss.from_config(config.loss)`` is what the trainer builds for two towers,
``ThreeTowersLoss.from_config(config.loss)`` for setting 3T (three ``clip_loss`` terms sharing
one gather); ``clip_loss``, ``sigmoid_loss`` and ``three_towers_loss`` are the functional forms.
See ``docs/loss.md``.
"""

from .config import LossConfig
from .contrastive import ContrastiveLoss, NonFiniteInputError, check_finite, clip_loss, sigmoid_loss
from .distributed import average_value, gather_with_grad
from .three_towers import ThreeTowersLoss, three_towers_loss

__all__ = [
    "ContrastiveLoss",
    "LossConfig",
    "NonFiniteInputError",
    "ThreeTowersLoss",
    "average_value",
    "check_finite",
    "clip_loss",
    "gather_with_grad",
    "sigmoid_loss",
    "three_towers_loss",
]
