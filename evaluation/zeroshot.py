"""Zero-shot classification: class prompts from templates become a linear classifier.

Each class's text embedding is the normalised mean of its prompts' normalised embeddings (CLIP,
section 3.1.4); an image is assigned the class of highest cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def fill_template(template: str, classname: str) -> str:
    """Put a class name into a prompt template written with ``{}`` or ``{c}``."""
    return template.replace("{c}", classname).replace("{}", classname)


@torch.no_grad()
def class_embeddings(
    encode_prompts: Callable[[list[str]], torch.Tensor], classnames: list[str], templates: list[str]
) -> torch.Tensor:
    """[C, D] normalised class embeddings; ``encode_prompts`` returns normalised [N, D] features."""
    rows = []
    for name in classnames:
        prompts = [fill_template(template, name) for template in templates]
        features = encode_prompts(prompts).float()
        mean = features.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def topk_accuracy(
    image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Fraction of images whose label is among the k highest-scoring classes, for each k."""
    scores = image_features.float() @ classifier.float().T  # [N, C]
    k_max = min(max(ks), scores.shape[1])
    top = scores.topk(k_max, dim=1).indices  # [N, k_max]
    hits = top == labels[:, None]
    return {f"zeroshot_top{k}": hits[:, : min(k, k_max)].any(dim=1).float().mean().item() for k in ks}
