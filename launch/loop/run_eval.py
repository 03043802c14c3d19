"""Evaluation inside a training run: the engine's model joined with its locked towers, every eval
set of the run (``data.eval_shards`` under its plain metric names, ``eval.sets`` as
``<set>/<metric>``) streamed and split across ranks, and 3T's alpha sweep.

Which kinds run on each set is decided when the evaluator is built, before training starts: a kind
asked for that a set cannot give is an error; with ``auto`` it is skipped and the reason logged.
Under ZeRO-3 every rank must take part (each forward all-gathers the partitioned parameters).
Rank 0 prints a progress line every ``eval.progress_every_s`` seconds while a set is encoded (images
encoded over all ranks, rate, time left when the set's size is known).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from tritower.data import tokenize
from tritower.data.eval_formats import EvalSource, expected_samples
from tritower.data.eval_set import EvalBatch, iter_eval_batches
from tritower.data.samples import BadDataStats
from tritower.evaluation import (
    EvalSetError,
    ProbeOptions,
    evaluate_alphas_batches,
    evaluate_batches,
    plan_kinds,
)
from tritower.evaluation.config import EvalSetSpec
from tritower.evaluation.features import ProgressReporter
from tritower.launch.config import ConfigError, TrainConfig
from tritower.launch.towers.model_setup import Towers, build_eval_tower
from tritower.model import CLIPWithLocked, LockedTowers, text_tower_spec


class RunEvaluator:
    """Evaluates the engine's current weights on the run's eval sets; returns ``{metric: value}``."""

    def __init__(
        self,
        cfg: TrainConfig,
        towers: Towers,
        locked: LockedTowers,
        module: nn.Module,
        eval_sets: list[tuple[EvalSetSpec, EvalSource]],
        tokenizer: object,
        device: torch.device,
        dtype: torch.dtype,
        log: Callable[[str], None] | None = None,
    ) -> None:
        """``log``: where rank 0's progress lines go (default: stdout, flushed)."""
        self.cfg, self.towers, self.locked, self.module = cfg, towers, locked, module
        self.log = log or (lambda line: print(line, flush=True))
        self.tokenizer = tokenizer
        self.context_length = text_tower_spec(cfg.model.text.tower).context_length
        self.image_spec = cfg.model.parsed.image_spec  # input size, mean, std: overrides included
        self.device, self.dtype = device, dtype
        self.built: dict[str, nn.Module] = {}  # towers built for evaluation only (precomputed ones)
        self.sets, self.notes = [], []
        for spec, source in eval_sets:
            try:
                plan = plan_kinds(
                    spec.name,
                    spec.kinds,
                    has_captions=source.has_captions,
                    has_labels=source.has_labels,
                    classnames=source.classnames,
                    templates=source.templates,
                )
            except EvalSetError as error:
                raise ConfigError(str(error)) from None
            label = spec.name or "data.eval_shards"
            for kind, reason in plan.skipped.items():
                self.notes.append(f"eval set {label}: {kind} skipped: {reason}")
            if plan.kinds:
                self.sets.append((spec, source, plan.kinds))
            else:
                self.notes.append(f"eval set {label}: nothing to evaluate, left out")
        self.probe = ProbeOptions(
            shots=cfg.eval.shot_values(),
            l2=cfg.eval.fewshot_l2,
            C=cfg.eval.probe_C,
            train_fraction=cfg.eval.probe_train_fraction,
            seed=cfg.train.seed,
        )

    def describe(self) -> list[str]:
        """One line per set (format, kinds) and one per skipped kind: logged once at start."""
        lines = [
            f"eval set {spec.name or 'data.eval_shards'}: {source.format}, {len(source.urls)} "
            f"{'files' if source.format == 'imagefolder' else 'shards'}, kinds {'+'.join(kinds)}"
            for spec, source, kinds in self.sets
        ]
        return lines + self.notes

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

    def _batches(self, source: EvalSource, stats: BadDataStats) -> Iterator[EvalBatch]:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        spec = self.image_spec
        return iter_eval_batches(
            source,
            self.tokenizer,
            spec.image_size,
            spec.mean,
            spec.std,
            self.context_length,
            batch_size=self.cfg.eval.batch_size,
            stats=stats,
            interpolation=spec.interpolation,
            rank=rank,
            world_size=world,
            max_samples=self.cfg.eval.max_samples,
        )

    def _progress(self, spec: EvalSetSpec, source: EvalSource) -> ProgressReporter | None:
        """Rank 0's progress lines for one set (other ranks still take part in the count's sum)."""
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        total = expected_samples(source, self.cfg.eval.max_samples)
        return ProgressReporter(
            lambda report: self.log(report.line()),
            name=spec.name or "data.eval_shards",
            total=total,
            every_s=self.cfg.eval.progress_every_s,
        )

    def __call__(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        alphas = self.cfg.eval.alpha_values() if self.cfg.model.parsed.three_towers else []
        for spec, source, kinds in self.sets:
            common = dict(
                kinds=kinds,
                classnames=source.classnames,
                templates=source.templates,
                image_shape=(3, self.image_spec.image_size, self.image_spec.image_size),
                context_length=self.context_length,
                device=self.device,
                dtype=self.dtype,
                probe=self.probe,
            )
            stats = BadDataStats()
            result = evaluate_batches(
                self.model(), self._batches(source, stats), self.tokenize, stats=stats,
                progress=self._progress(spec, source), **common,
            )  # fmt: skip
            if alphas:
                result |= evaluate_alphas_batches(
                    self.module, self.third_tower(), self._batches(source, BadDataStats()), self.tokenize, alphas,
                    **common,
                )  # fmt: skip
            prefix = f"{spec.name}/" if spec.name else ""
            metrics.update({prefix + name: value for name, value in result.items()})
        return metrics
