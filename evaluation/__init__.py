"""Zero-shot classification and image-text retrieval for CLIP-style models."""

from tritower.evaluation.retrieval import recall_at_k
from tritower.evaluation.runner import evaluate
from tritower.evaluation.zeroshot import class_embeddings, topk_accuracy

__all__ = ["class_embeddings", "evaluate", "recall_at_k", "topk_accuracy"]
