"""Evaluation inside a training run: the engine's model joined with its locked towers, zero-shot
and retrieval on the run's eval set, and 3T's alpha sweep.

Under ZeRO-3 every rank must take part (each forward all-gathers the partitioned parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from tritower.data import EvalSet, tokenize
from tritower.evaluation import evaluate, evaluate_alphas
from tritower.launch.config import TrainConfig
from tritower.launch.model_setup import Towers, build_eval_tower
from tritower.model import CLIPWithLocked, LockedTowers, text_tower_spec


class RunEvaluator:
    """Evaluates the engine's current weights on one eval set; returns ``{metric: value}``."""

    def __init__(
        self,
        cfg: TrainConfig,
        towers: Towers,
        locked: LockedTowers,
        module: nn.Module,
        eval_set: EvalSet,
        tokenizer: object,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.cfg, self.towers, self.locked, self.module = cfg, towers, locked, module
        self.eval_set, self.tokenizer = eval_set, tokenizer
        self.context_length = text_tower_spec(cfg.model.text_tower).context_length
        self.device, self.dtype = device, dtype
        self.built: dict[str, nn.Module] = {}  # towers built for evaluation only (precomputed ones)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(self.tokenizer, captions, self.context_length)

    def _built(self, role: str) -> nn.Module:
        if role not in self.built:
            self.built[role] = build_eval_tower(self.cfg, role).to(self.device)
        return self.built[role]

    def third_tower(self) -> nn.Module:
        """3T's frozen third tower h (built for evaluation when its embeddings came precomputed)."""
        return self.locked.third if self.locked.third is not None else self._built("third")

    def model(self) -> nn.Module:
        """The engine's model with its locked towers (a precomputed tower is built for this only)."""
        locked = self.locked
        if self.towers.precomputed == "image":
            locked = type(locked)(image=self._built("image"), text=locked.text, third=locked.third)
        if locked.image is None and locked.text is None:
            return self.module
        return CLIPWithLocked(self.module, locked)

    def __call__(self) -> dict[str, float]:
        common = dict(
            device=self.device,
            dtype=self.dtype,
            batch_size=self.cfg.eval.batch_size,
            max_samples=self.cfg.eval.max_samples,
        )
        metrics = evaluate(self.model(), self.eval_set, self.tokenize, **common)
        alphas = self.cfg.eval.alpha_values()
        if alphas and self.cfg.model.parsed.three_towers:
            metrics.update(
                evaluate_alphas(self.module, self.third_tower(), self.eval_set, self.tokenize, alphas, **common)
            )
        return metrics
