"""Three Towers evaluated over several mixing weights: ``evaluate_alphas`` encodes the pieces of
the alpha mixture (``tritower.model.mixture``: score_alpha(x, t) = alpha <f(x), g(t)> + (1 - alpha)
<h_g(h(x)), g_h(g(t))>) once and reports every metric for each alpha.

Zero-shot class embeddings are formed from the concatenated text embeddings as for any model
(normalised mean over the prompts), so the numbers are those of the exported mixed model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from tritower.data.eval_set import EvalBatch, in_memory_batches
from tritower.data.samples import BadDataStats
from tritower.evaluation.features import encode_set
from tritower.evaluation.runner import ProbeOptions, metrics_of
from tritower.evaluation.zeroshot import class_embeddings
from tritower.model.mixture import ThreeTowersMixture, check_alpha, mix_embeddings

if TYPE_CHECKING:
    from tritower.evaluation.runner import EvalSetLike


def alpha_key(metric: str, alpha: float) -> str:
    """``zeroshot_top1`` at 0.5 -> ``zeroshot_top1@alpha=0.5``."""
    return f"{metric}@alpha={alpha:g}"


@torch.no_grad()
def evaluate_alphas_batches(
    model: nn.Module,
    third_tower: nn.Module,
    batches: Iterable[EvalBatch],
    tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    alphas: list[float] | tuple[float, ...],
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
    collective: bool = True,
) -> dict[str, float]:
    """The metrics of ``kinds`` for each alpha, keyed ``<metric>@alpha=<alpha>``, on a streamed set.

    The same numbers as evaluating ``ThreeTowersMixture(model, third_tower, alpha)`` for each alpha,
    but the towers run once: f(x), h_g(h(x)), g(t) and g_h(g(t)) are encoded once (side by side,
    [N, 2D]) and mixed per alpha. Under ZeRO-3 every rank must call this.
    """
    alphas = [check_alpha(a) for a in alphas]
    mixture = ThreeTowersMixture(model, third_tower, 1.0)
    was_training = model.training
    model.eval()

    def images(pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([part.float() for part in mixture.image_parts(pixels)], dim=1)

    def texts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([part.float() for part in mixture.text_parts(input_ids, attention_mask)], dim=1)

    features = encode_set(
        batches,
        images,
        texts if "retrieval" in kinds else None,
        image_shape=image_shape,
        context_length=context_length,
        device=device,
        dtype=dtype,
        stats=stats,
        collective=collective,
    )
    prompt_parts: dict[tuple[str, ...], torch.Tensor] = {}

    def encode_prompts(prompts: list[str], alpha: float) -> torch.Tensor:
        if tuple(prompts) not in prompt_parts:
            ids, mask = tokenize(prompts)
            prompt_parts[tuple(prompts)] = texts(ids.to(device), mask.to(device)).cpu()
        both = prompt_parts[tuple(prompts)]
        return mix_embeddings(*both.chunk(2, dim=1), alpha)

    metrics: dict[str, float] = {}
    for alpha in alphas:
        mixed = type(features)(
            image=mix_embeddings(*features.image.chunk(2, dim=1), alpha),
            labels=features.labels,
            text=mix_embeddings(*features.text.chunk(2, dim=1), alpha) if len(features.text) else features.text,
            caption_to_image=features.caption_to_image,
        )
        classifier = None
        if "zeroshot" in kinds:
            classifier = class_embeddings(lambda p, a=alpha: encode_prompts(p, a), classnames, templates)
        result = metrics_of(mixed, kinds, classifier, probe or ProbeOptions())
        metrics.update({alpha_key(name, alpha): value for name, value in result.items()})
    model.train(was_training)
    return metrics


@torch.no_grad()
def evaluate_alphas(
    model: nn.Module,
    third_tower: nn.Module,
    eval_set: EvalSetLike,
    tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    alphas: list[float] | tuple[float, ...],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 256,
    max_samples: int = 0,
) -> dict[str, float]:
    """``evaluate``'s metrics for each alpha on an in-memory set, in this process alone.
    Zero-shot is skipped when the set has no class names or templates."""
    zeroshot = bool(eval_set.classnames) and bool(eval_set.templates)
    return evaluate_alphas_batches(
        model,
        third_tower,
        in_memory_batches(eval_set, batch_size, max_samples),
        tokenize,
        alphas,
        kinds=("zeroshot", "retrieval") if zeroshot else ("retrieval",),
        classnames=eval_set.classnames,
        templates=eval_set.templates,
        image_shape=tuple(eval_set.images.shape[1:]),
        context_length=eval_set.input_ids.shape[1],
        device=device,
        dtype=dtype,
        collective=False,
    )
