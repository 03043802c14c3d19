"""Zero-shot classification: class prompts from templates become a linear classifier.

Each class's text embedding is the normalised mean of its prompts' normalised embeddings (CLIP,
section 3.1.4); an image is assigned the class of highest cosine similarity. Accuracy is over the
labelled samples only (label -1 = unlabelled, counted apart), ties between classes are broken at
random in expectation (``tritower.evaluation.ranking``), and the mean per-class recall (balanced
accuracy: top-1 averaged within each class present, then over those classes) stands beside top-1
for imbalanced sets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tritower.evaluation.ranking import TIE_TOLERANCE, block_rows, hit_probabilities


def fill_template(template: str, classname: str) -> str:
    """Put a class name into a prompt template written with ``{}`` or ``{c}``."""
    return template.replace("{c}", classname).replace("{}", classname)


@torch.no_grad()
def class_embeddings(
    encode_prompts: Callable[[list[str]], torch.Tensor], classnames: list[str], templates: list[str]
) -> torch.Tensor:
    """[C, D] normalised class embeddings; ``encode_prompts`` returns normalised [N, D] features."""
    if not classnames or not templates:
        raise ValueError(
            f"zero-shot needs class names and prompt templates (got {len(classnames)} names, "
            f"{len(templates)} templates)"
        )
    rows = []
    for name in classnames:
        prompts = [fill_template(template, name) for template in templates]
        features = encode_prompts(prompts).float()
        mean = features.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def topk_accuracy(
    image_features: torch.Tensor,
    classifier: torch.Tensor,
    labels: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
    *,
    tolerance: float = TIE_TOLERANCE,
) -> dict[str, float]:
    """``zeroshot_top{k}`` over the labelled samples, ``zeroshot_mean_per_class_recall`` and
    ``zeroshot_unlabelled`` (how many samples had label -1 and were left out).

    A k larger than the number of classes counts as k = C (every labelled sample is a hit).
    """
    labels = labels.long()
    labelled = labels >= 0
    features, targets = image_features[labelled].float(), labels[labelled]
    classes = classifier.shape[0]
    if (targets >= classes).any():
        raise ValueError(f"zero-shot: label {int(targets.max())} but only {classes} class names")
    unlabelled = float((~labelled).sum())
    if targets.numel() == 0:
        nan = float("nan")
        return (
            {f"zeroshot_top{k}": nan for k in ks}
            | {"zeroshot_mean_per_class_recall": nan}
            | {"zeroshot_unlabelled": unlabelled}
        )
    capped = tuple(min(k, classes) for k in ks)
    order = tuple(sorted(set(capped) | {1}))
    # One result tensor filled block by block (not a list of per-block results: see retrieval.py).
    hits = torch.zeros(len(targets), len(order), dtype=torch.float64)  # [labelled, len(order)]
    chunk, weights = block_rows(classes), classifier.float()
    for start in range(0, len(targets), chunk):
        scores = features[start : start + chunk] @ weights.T  # [chunk, C]: bounded however many classes
        chunk_targets = targets[start : start + chunk]
        positives = torch.arange(classes)[None, :] == chunk_targets[:, None]
        hits[start : start + len(chunk_targets)] = hit_probabilities(scores, positives, order, tolerance=tolerance)
    metrics = {f"zeroshot_top{k}": hits[:, order.index(c)].mean().item() for k, c in zip(ks, capped)}
    top1 = hits[:, order.index(1)]
    per_class = torch.zeros(classes, dtype=torch.float64).index_add_(0, targets, top1)
    counts = torch.bincount(targets, minlength=classes)
    present = counts > 0
    metrics["zeroshot_mean_per_class_recall"] = (per_class[present] / counts[present]).mean().item()
    metrics["zeroshot_unlabelled"] = unlabelled
    return metrics
