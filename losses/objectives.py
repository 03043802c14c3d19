"""The training objectives, one calling convention for all: ``objective(outputs) -> dict``.

``outputs`` is the model's forward dict (features and temperatures, e.g. ``image_features``,
``text_features``, ``logit_scale``; SigLIP adds ``logit_bias``; 3T its third-tower features).
The result holds ``"loss"`` (the scalar to back-propagate, identical on every rank) and the
objective's named terms, detached (3T: ``main``, ``image_third``, ``text_third``). The trainer,
GradCache, the precomputed-embedding paths and the benchmarks call nothing else.

CLIP (softmax), SigLIP (sigmoid) and 3T are the objectives, chosen from ``OBJECTIVES`` by
``objective_name``; LiT is a tower setting, not an objective (a locked tower only changes which
features arrive). Objectives hold no parameters: temperatures and biases live in the model.
"""

from __future__ import annotations

from torch import Tensor, nn

from .config import LossConfig
from .contrastive import clip_loss, sigmoid_loss
from .distributed import ProcessGroup
from .three_towers import INPUT_KEYS, three_towers_loss

Outputs = dict[str, Tensor]


class Objective(nn.Module):
    """Base class: ``forward(outputs) -> {"loss": scalar, <term>: detached scalar, ...}``."""

    needs: tuple[str, ...] = ()
    """Keys of ``outputs`` the objective reads."""

    def __init__(self, config: LossConfig, group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.group = group

    def _inputs(self, outputs: Outputs) -> list[Tensor]:
        missing = [key for key in self.needs if key not in outputs]
        if missing:
            raise KeyError(f"the {type(self).__name__} needs the model outputs {missing}; got {sorted(outputs)}")
        return [outputs[key] for key in self.needs]

    def _common(self) -> dict:
        c = self.config
        return dict(impl=c.impl, scope=c.scope, group=self.group, tile_size=c.tile_size, check_inputs=c.check_finite)

    def extra_repr(self) -> str:
        c = self.config
        return f"impl={c.impl}, scope={c.scope}, tile_size={c.tile_size}"


class CLIPObjective(Objective):
    """CLIP's symmetric InfoNCE over the global batch (``clip_loss``)."""

    needs = ("image_features", "text_features", "logit_scale")

    def forward(self, outputs: Outputs) -> dict[str, Tensor]:
        if outputs.get("logit_bias") is not None:
            raise ValueError(
                "the softmax (CLIP) objective takes no logit_bias: the model was built for loss.kind=sigmoid"
            )
        return {"loss": clip_loss(*self._inputs(outputs), **self._common())}


class SigLIPObjective(Objective):
    """SigLIP's pairwise sigmoid loss (``sigmoid_loss``), with the model's learnt ``logit_bias``."""

    needs = ("image_features", "text_features", "logit_scale", "logit_bias")

    def forward(self, outputs: Outputs) -> dict[str, Tensor]:
        if outputs.get("logit_bias") is None:
            raise ValueError("the sigmoid (SigLIP) objective needs logit_bias (a learnable [1] parameter of the model)")
        return {"loss": sigmoid_loss(*self._inputs(outputs), **self._common())}


class ThreeTowersObjective(Objective):
    """The 3T loss (``three_towers_loss``): three CLIP terms sharing one cross-rank gather."""

    needs = INPUT_KEYS

    def __init__(self, config: LossConfig, group: ProcessGroup | None = None) -> None:
        if config.kind != "softmax":
            raise ValueError(
                f"loss.kind={config.kind!r} is not supported with setting '3T' yet: the Three "
                "Towers loss is implemented for the softmax (CLIP) loss only; use loss.kind=softmax"
            )
        super().__init__(config, group)

    def forward(self, outputs: Outputs) -> dict[str, Tensor]:
        loss, terms = three_towers_loss(
            *self._inputs(outputs), weights=self.config.three_towers_weights, **self._common()
        )
        return {"loss": loss, **terms}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weights={self.config.three_towers_weights}"


OBJECTIVES: dict[str, type[Objective]] = {
    "clip": CLIPObjective,
    "siglip": SigLIPObjective,
    "3T": ThreeTowersObjective,
}
"""Every objective, by name."""


def objective_name(config: LossConfig, three_towers: bool = False) -> str:
    """The ``OBJECTIVES`` key for a loss section: ``3T`` for Three Towers, else by ``loss.kind``."""
    if three_towers:
        return "3T"
    return {"softmax": "clip", "sigmoid": "siglip"}[config.kind]


def build_objective(config: LossConfig, three_towers: bool = False, group: ProcessGroup | None = None) -> Objective:
    """The objective for the ``loss`` section (``three_towers``: the model is a 3T model)."""
    return OBJECTIVES[objective_name(config, three_towers)](config, group)
