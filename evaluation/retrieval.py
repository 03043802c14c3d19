"""Image-text retrieval recall with one or several captions per image.

Image->text: an image is a hit at k when any of its captions is among the k best captions.
Text->image: each caption is a query; a hit when its image is among the k best images (the
convention of CLIP-style papers and clip_benchmark). Ties are broken at random in expectation
(``tritower.evaluation.ranking``): equal scores never count as a hit for free.
"""

from __future__ import annotations

import torch

from tritower.evaluation.ranking import TIE_TOLERANCE, block_rows, hit_probabilities


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_to_image: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    *,
    tolerance: float = TIE_TOLERANCE,
    pessimistic: bool = False,
) -> dict[str, float]:
    """``image_to_text_R@k`` and ``text_to_image_R@k`` for N images and M captions.

    ``image_features`` [N, D] and ``text_features`` [M, D] are normalised; ``caption_to_image``
    [M] int64 is the index of each caption's image. Every image needs at least one caption.
    """
    images, texts = image_features.float(), text_features.float()
    owner = caption_to_image.long()
    count = images.shape[0]
    if torch.bincount(owner, minlength=count).min() == 0:
        raise ValueError("retrieval: an image without a caption has no positive to retrieve")
    options = dict(tolerance=tolerance, pessimistic=pessimistic)
    # Results go into tensors allocated once: per-block results kept in a list are small long-lived
    # allocations between each block's large temporaries, and glibc then cannot give those back
    # (RSS grew with the number of blocks: +250 MiB at 10,000 pairs).
    i2t = torch.zeros(count, len(ks), dtype=torch.float64)
    t2i = torch.zeros(texts.shape[0], len(ks), dtype=torch.float64)
    # Blocks of queries sized by the candidates (``block_rows``): memory stays flat as the set grows.
    chunk = block_rows(texts.shape[0])
    for start in range(0, count, chunk):
        scores = images[start : start + chunk] @ texts.T  # [chunk images, M captions]
        rows = torch.arange(start, start + scores.shape[0])
        i2t[rows] = hit_probabilities(scores, owner[None, :] == rows[:, None], ks, **options)
    chunk = block_rows(count)
    for start in range(0, texts.shape[0], chunk):
        scores = texts[start : start + chunk] @ images.T  # [chunk captions, N images]
        targets = owner[start : start + scores.shape[0]]
        hits = hit_probabilities(scores, torch.arange(count)[None, :] == targets[:, None], ks, **options)
        t2i[start : start + scores.shape[0]] = hits
    metrics = {}
    for direction, hits in (("image_to_text", i2t), ("text_to_image", t2i)):
        for column, k in enumerate(ks):
            metrics[f"{direction}_R@{k}"] = hits[:, column].mean().item()
    return metrics


def recall_at_k(
    image_features: torch.Tensor, text_features: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """R@k in both directions for N paired features: image i and caption i are the only match."""
    return retrieval_metrics(image_features, text_features, torch.arange(image_features.shape[0]), ks)
