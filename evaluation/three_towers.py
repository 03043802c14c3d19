"""Three Towers at inference: the alpha mixture of the main towers and the third tower.

For alpha in [0, 1] the 3T paper's convex combination scores an image x against a text t as

    score_alpha(x, t) = alpha * <f(x), g(t)> + (1 - alpha) * <h_g(h(x)), g_h(g(t))>

(unit-norm embeddings; alpha = 1 is the plain 3T model, which costs what CLIP costs; alpha = 0
reads the frozen third tower through its text-side head, LiT-like). It is one pair of towers
whose dot product is exactly that score: the image side is [sqrt(alpha) f(x), sqrt(1-alpha)
h_g(h(x))] and the text side [sqrt(alpha) g(t), sqrt(1-alpha) g_h(g(t))], both unit-norm
(2 * embed_dim wide). ``ThreeTowersMixture`` is that pair behind the usual ``encode_image`` /
``encode_text``, so ``evaluate`` and the export's inference model use it unchanged;
``evaluate_alphas`` encodes the pieces once and reports every metric for several alphas.

Zero-shot class embeddings are formed from the concatenated text embeddings as for any model
(normalised mean over the prompts), so the numbers are those of the exported mixed model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from tritower.evaluation.retrieval import recall_at_k
from tritower.evaluation.zeroshot import class_embeddings, topk_accuracy
from tritower.model.mixture import ThreeTowersMixture, check_alpha, mix_embeddings

if TYPE_CHECKING:
    from tritower.evaluation.runner import EvalSetLike


def alpha_key(metric: str, alpha: float) -> str:
    """``zeroshot_top1`` at 0.5 -> ``zeroshot_top1@alpha=0.5``."""
    return f"{metric}@alpha={alpha:g}"


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
    """Every metric of ``evaluate`` for each alpha, keyed ``<metric>@alpha=<alpha>``.

    The same numbers as ``evaluate(ThreeTowersMixture(model, third_tower, alpha), ...)`` for each
    alpha, but the towers run once: f(x), h_g(h(x)), g(t) and g_h(g(t)) are encoded once and
    mixed per alpha. Zero-shot is skipped when the set has no class names or templates. Under
    ZeRO-3 every rank must call this (forwards gather parameters).
    """
    alphas = [check_alpha(a) for a in alphas]
    mixture = ThreeTowersMixture(model, third_tower, 1.0)
    was_training = model.training
    model.eval()
    count = len(eval_set.labels) if max_samples <= 0 else min(max_samples, len(eval_set.labels))

    def encode_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = [
            mixture.image_parts(images[i : i + batch_size].to(device=device, dtype=dtype))
            for i in range(0, len(images), batch_size)
        ]
        return tuple(torch.cat([c[k].float().cpu() for c in chunks]) for k in (0, 1))

    def encode_tokens(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = [
            mixture.text_parts(input_ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device))
            for i in range(0, len(input_ids), batch_size)
        ]
        return tuple(torch.cat([c[k].float().cpu() for c in chunks]) for k in (0, 1))

    prompts_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def prompt_parts(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(prompts) not in prompts_cache:
            prompts_cache[tuple(prompts)] = encode_tokens(*tokenize(prompts))
        return prompts_cache[tuple(prompts)]

    images = encode_images(eval_set.images[:count])
    texts = encode_tokens(eval_set.input_ids[:count], eval_set.attention_mask[:count])
    zeroshot = bool(eval_set.classnames) and bool(eval_set.templates)
    metrics: dict[str, float] = {}
    for alpha in alphas:
        image_features = mix_embeddings(*images, alpha)
        result = recall_at_k(image_features, mix_embeddings(*texts, alpha))
        if zeroshot:
            classifier = class_embeddings(
                lambda prompts, alpha=alpha: mix_embeddings(*prompt_parts(prompts), alpha),
                eval_set.classnames,
                eval_set.templates,
            )
            result = topk_accuracy(image_features, classifier, eval_set.labels[:count]) | result
        metrics.update({alpha_key(name, alpha): value for name, value in result.items()})
    model.train(was_training)
    return metrics
