"""Evaluation of CLIP-style models: zero-shot classification, image-text retrieval (several
captions per image), linear probes, streamed and sharded over ranks (``features.py``), the suite of
one eval set (``runner.py``) and the alpha mixture of a Three Towers model (``three_towers.py``).
See docs/evaluation.md."""

from tritower.evaluation.features import SetFeatures, encode_set
from tritower.evaluation.linear_probe import fewshot_metrics, logistic_probe_metrics
from tritower.evaluation.retrieval import recall_at_k, retrieval_metrics
from tritower.evaluation.runner import (
    COUNTS,
    KINDS,
    EvalSetError,
    KindPlan,
    ProbeOptions,
    evaluate,
    evaluate_batches,
    metrics_of,
    plan_kinds,
)
from tritower.evaluation.three_towers import evaluate_alphas, evaluate_alphas_batches
from tritower.evaluation.zeroshot import class_embeddings, topk_accuracy

__all__ = [
    "COUNTS",
    "KINDS",
    "EvalSetError",
    "KindPlan",
    "ProbeOptions",
    "SetFeatures",
    "class_embeddings",
    "encode_set",
    "evaluate",
    "evaluate_alphas",
    "evaluate_alphas_batches",
    "evaluate_batches",
    "fewshot_metrics",
    "logistic_probe_metrics",
    "metrics_of",
    "plan_kinds",
    "recall_at_k",
    "retrieval_metrics",
    "topk_accuracy",
]
