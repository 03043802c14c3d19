"""The evaluation suite of one eval set: which kinds can run, features, and one flat dict of metrics.

Kinds: ``zeroshot`` (needs class names, templates and labels), ``retrieval`` (needs captions),
``linear_probe`` (needs labels: big_vision-style few-shot ridge probes and a full-data logistic
regression, ``linear_probe.py``). ``plan_kinds`` decides before any sample is read: a kind asked
for by name that the set cannot support is an error naming the fix; with ``auto`` a kind the set
cannot support is skipped with its reason.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from tritower.data.eval_formats import imagenet_classnames
from tritower.data.eval_set import EvalBatch, in_memory_batches
from tritower.data.samples import BadDataStats
from tritower.evaluation.features import ProgressReporter, SetFeatures, encode_set
from tritower.evaluation.linear_probe import FEWSHOT_SHOTS, fewshot_metrics, logistic_probe_metrics
from tritower.evaluation.retrieval import retrieval_metrics
from tritower.evaluation.zeroshot import class_embeddings, topk_accuracy

KINDS: tuple[str, ...] = ("zeroshot", "retrieval", "linear_probe")
AUTO_KINDS: tuple[str, ...] = ("zeroshot", "retrieval")
"""What ``auto`` runs when the set supports it (probes only when asked for: they fit models)."""

COUNTS = frozenset({"eval_samples", "eval_bad", "eval_nonfinite", "zeroshot_unlabelled"})
"""Metric names that are sample counts, not fractions (printed as integers)."""


def counts_as_int(metrics: dict[str, float]) -> dict[str, float | int]:
    """``metrics`` with every count (``COUNTS``, also under a set's ``NAME/`` and an ``@alpha``
    suffix) as an int: JSON readers get 1500 for every set, never 1500.0 for some."""

    def is_count(key: str) -> bool:
        return key.rsplit("/", 1)[-1].split("@", 1)[0] in COUNTS

    return {k: int(v) if is_count(k) and isinstance(v, float) and math.isfinite(v) else v for k, v in metrics.items()}


Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


class EvalSetError(ValueError):
    """An eval set cannot give a metric that was asked for; the message names the fix."""


class EvalSetLike(Protocol):
    """What ``evaluate`` reads of an in-memory held-out set (``tritower.data.EvalSet`` has it)."""

    images: torch.Tensor  # float32 [N, 3, H, W], normalised
    input_ids: torch.Tensor  # int64 [N, L], the caption of each image
    attention_mask: torch.Tensor  # int64 [N, L]
    labels: torch.Tensor  # int64 [N], zero-shot class index
    classnames: list[str]
    templates: list[str]


@dataclass
class ProbeOptions:
    """Settings of the linear probes."""

    shots: tuple[int, ...] = FEWSHOT_SHOTS
    l2: float = 1.0
    C: float = 1.0
    train_fraction: float = 0.5
    seed: int = 0


@dataclass
class KindPlan:
    """The kinds that will run on a set, and why the others will not."""

    kinds: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)


def plan_kinds(
    name: str,
    requested: tuple[str, ...] | None,
    *,
    has_captions: bool,
    has_labels: bool,
    classnames: list[str],
    templates: list[str],
) -> KindPlan:
    """The kinds to run on set ``name``; ``requested`` None means ``auto`` (see the module)."""
    missing = {
        "zeroshot": None
        if classnames and templates and has_labels
        else "no class names (classnames.txt at the set's root or beside its shards, or classnames=imagenet)"
        if not classnames
        else "no labels in its samples (check the label key)"
        if not has_labels
        else "no prompt templates",
        "retrieval": None if has_captions else "no captions in its samples (a classification set)",
        "linear_probe": None if has_labels else "no labels in its samples",
    }
    label = f"eval set {name!r}" if name else "the eval set (data.eval_shards)"
    duplicated = sorted(n for n, count in Counter(classnames).items() if count > 1)
    if duplicated and list(classnames) != imagenet_classnames():  # CLIP's own list has two: kept as CLIP has them
        raise EvalSetError(
            f"{label}: class names {', '.join(map(repr, duplicated[:5]))} appear more than once: zero-shot would "
            "score identical prompts as ties. Give each class its own name (classnames.txt, one per line)"
        )
    if requested is not None:
        for kind in requested:
            if kind not in KINDS:
                raise EvalSetError(f"{label}: unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
            if missing[kind]:
                raise EvalSetError(
                    f"{label} cannot run {kind}: {missing[kind]}. Fix the set, or drop {kind} from its kinds"
                )
        return KindPlan(tuple(requested))
    kinds = tuple(kind for kind in AUTO_KINDS if not missing[kind])
    return KindPlan(kinds, {kind: missing[kind] for kind in AUTO_KINDS if missing[kind]})


def metrics_of(
    features: SetFeatures, kinds: tuple[str, ...], classifier: torch.Tensor | None, probe: ProbeOptions
) -> dict[str, float]:
    """Every metric of ``kinds`` from a set's features (``classifier``: [C, D] zero-shot weights).

    Non-finite features (a diverged model) are not scored: every metric they enter is NaN, and
    ``eval_nonfinite`` counts the feature rows (images, captions, classes) that were not finite."""
    rows = [features.image, features.text] + ([classifier] if classifier is not None else [])
    metrics: dict[str, float] = {
        "eval_nonfinite": float(sum(int((~torch.isfinite(r)).any(dim=1).sum()) for r in rows if r.numel()))
    }
    if "zeroshot" in kinds:
        assert classifier is not None
        metrics.update(topk_accuracy(features.image, classifier, features.labels))
    if "retrieval" in kinds:
        metrics.update(retrieval_metrics(features.image, features.text, features.caption_to_image))
    if "linear_probe" in kinds:
        metrics.update(fewshot_metrics(features.image, features.labels, probe.shots, l2=probe.l2, seed=probe.seed))
        metrics.update(
            logistic_probe_metrics(
                features.image, features.labels, C=probe.C, train_fraction=probe.train_fraction, seed=probe.seed
            )
        )
    return metrics


def zeroshot_classifier(
    encode_texts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokenize: Tokenize,
    classnames: list[str],
    templates: list[str],
    device: torch.device,
) -> torch.Tensor:
    """[C, D] class embeddings (every rank computes all of them: same forwards in lockstep)."""

    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        ids, mask = tokenize(prompts)
        return encode_texts(ids.to(device), mask.to(device)).float().cpu()

    return class_embeddings(encode_prompts, classnames, templates)


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[EvalBatch],
    tokenize: Tokenize,
    *,
    kinds: tuple[str, ...],
    classnames: list[str],
    templates: list[str],
    image_shape: tuple[int, int, int],
    context_length: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    stats: BadDataStats | None = None,
    probe: ProbeOptions | None = None,
    progress: ProgressReporter | None = None,
) -> dict[str, float]:
    """The metrics of ``kinds`` on a streamed set, plus ``eval_samples`` and ``eval_bad``.

    ``model`` has ``encode_image(images)`` and ``encode_text(input_ids, attention_mask)`` returning
    normalised features. In a distributed run every rank calls this with its own share of the
    set (features are gathered; see ``features.py``) and gets the same metrics. ``progress``
    (on the rank that prints): progress lines while the set is encoded.
    """
    was_training = model.training
    model.eval()
    features = encode_set(
        batches,
        model.encode_image,
        model.encode_text if "retrieval" in kinds else None,
        image_shape=image_shape,
        context_length=context_length,
        device=device,
        dtype=dtype,
        stats=stats,
        progress=progress,
    )
    classifier = None
    if "zeroshot" in kinds:
        classifier = zeroshot_classifier(model.encode_text, tokenize, classnames, templates, device)
    model.train(was_training)
    return metrics_of(features, kinds, classifier, probe or ProbeOptions()) | {
        "eval_samples": float(len(features.labels)),
        "eval_bad": float(sum(features.bad.values())),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    eval_set: EvalSetLike,
    tokenize: Tokenize,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 256,
    max_samples: int = 0,
) -> dict[str, float]:
    """Zero-shot (when the set has class names and templates) and retrieval on an in-memory set,
    in this process alone (no collectives)."""
    was_training = model.training
    model.eval()
    features = encode_set(
        in_memory_batches(eval_set, batch_size, max_samples),
        model.encode_image,
        model.encode_text,
        image_shape=tuple(eval_set.images.shape[1:]),
        context_length=eval_set.input_ids.shape[1],
        device=device,
        dtype=dtype,
        collective=False,
    )
    kinds = ("zeroshot", "retrieval") if eval_set.classnames and eval_set.templates else ("retrieval",)
    classifier = None
    if "zeroshot" in kinds:
        classifier = zeroshot_classifier(model.encode_text, tokenize, eval_set.classnames, eval_set.templates, device)
    model.train(was_training)
    return metrics_of(features, kinds, classifier, ProbeOptions())
