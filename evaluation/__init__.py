"""Zero-shot classification and image-text retrieval for CLIP-style models, and the alpha
mixture of a Three Towers model (``three_towers.py``)."""

from tritower.evaluation.retrieval import recall_at_k
from tritower.evaluation.runner import evaluate
from tritower.evaluation.three_towers import evaluate_alphas
from tritower.evaluation.zeroshot import class_embeddings, topk_accuracy

__all__ = [
    "class_embeddings",
    "evaluate",
    "evaluate_alphas",
    "recall_at_k",
    "topk_accuracy",
]
