"""Runs every evaluation of a CLIP-style model on a held-out set and returns one flat dict."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from tritower.evaluation.retrieval import recall_at_k
from tritower.evaluation.zeroshot import class_embeddings, topk_accuracy


class EvalSetLike(Protocol):
    """What evaluation reads of a held-out set (``tritower.data.EvalSet`` has it)."""

    images: torch.Tensor  # float32 [N, 3, H, W], normalised
    input_ids: torch.Tensor  # int64 [N, L], the caption of each image
    attention_mask: torch.Tensor  # int64 [N, L]
    labels: torch.Tensor  # int64 [N], zero-shot class index
    classnames: list[str]
    templates: list[str]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    eval_set: EvalSetLike,
    tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 256,
    max_samples: int = 0,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 and retrieval R@1/5/10 on ``eval_set``.

    ``model`` has ``encode_image(images)`` and ``encode_text(input_ids, attention_mask)`` returning
    normalised features. Under ZeRO-3 every rank must call this (forwards gather parameters).
    """
    was_training = model.training
    model.eval()
    count = len(eval_set.labels) if max_samples <= 0 else min(max_samples, len(eval_set.labels))

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        chunks = [
            model.encode_image(images[i : i + batch_size].to(device=device, dtype=dtype)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks)

    def encode_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        chunks = [
            model.encode_text(input_ids[i : i + batch_size].to(device), attention_mask[i : i + batch_size].to(device))
            .float()
            .cpu()
            for i in range(0, len(input_ids), batch_size)
        ]
        return torch.cat(chunks)

    image_features = encode_images(eval_set.images[:count])
    text_features = encode_tokens(eval_set.input_ids[:count], eval_set.attention_mask[:count])
    classifier = class_embeddings(
        lambda prompts: encode_tokens(*tokenize(prompts)), eval_set.classnames, eval_set.templates
    )
    metrics = topk_accuracy(image_features, classifier, eval_set.labels[:count])
    metrics.update(recall_at_k(image_features, text_features))
    model.train(was_training)
    return metrics
