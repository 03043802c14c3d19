"""Image-text retrieval recall: image i and caption i are the only matching pair."""

from __future__ import annotations

import torch


def recall_at_k(
    image_features: torch.Tensor, text_features: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """R@k in both directions for N paired, normalised image and text features."""
    similarity = image_features.float() @ text_features.float().T  # [N images, N captions]
    targets = torch.arange(similarity.shape[0])
    metrics = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        # Rank of the true partner = number of candidates scoring strictly higher.
        true_scores = scores[targets, targets]
        rank = (scores > true_scores[:, None]).sum(dim=1)
        for k in ks:
            metrics[f"{direction}_R@{k}"] = (rank < k).float().mean().item()
    return metrics
