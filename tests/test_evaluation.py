"""Zero-shot accuracy and retrieval recall against plain float64 loops."""

from __future__ import annotations

import json

import torch

from tritower.evaluation import class_embeddings, recall_at_k, topk_accuracy


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_topk_accuracy_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    images, classes = _unit(torch.randn(57, 8, generator=g)), _unit(torch.randn(11, 8, generator=g))
    labels = torch.randint(0, 11, (57,), generator=g)
    got = topk_accuracy(images, classes, labels, ks=(1, 5))
    for k in (1, 5):
        hits = 0
        for i in range(57):
            scores = [float(sum(images[i, d].double() * classes[c, d].double() for d in range(8))) for c in range(11)]
            better = sum(1 for c in range(11) if scores[c] > scores[int(labels[i])])
            hits += better < k
        assert abs(got[f"zeroshot_top{k}"] - hits / 57) < 1e-6


def test_recall_matches_loop_both_directions() -> None:
    g = torch.Generator().manual_seed(1)
    images = _unit(torch.randn(40, 6, generator=g))
    texts = _unit(images + 0.8 * torch.randn(40, 6, generator=g))
    got = recall_at_k(images, texts, ks=(1, 5, 10))
    sim = images.double() @ texts.double().T
    for k in (1, 5, 10):
        i2t = sum(1 for i in range(40) if sum(1 for j in range(40) if sim[i, j] > sim[i, i]) < k) / 40
        t2i = sum(1 for j in range(40) if sum(1 for i in range(40) if sim[i, j] > sim[j, j]) < k) / 40
        assert abs(got[f"image_to_text_R@{k}"] - i2t) < 1e-6
        assert abs(got[f"text_to_image_R@{k}"] - t2i) < 1e-6
    assert got["image_to_text_R@10"] > got["image_to_text_R@1"]  # noisy pairs: not trivially perfect


def test_class_embeddings_average_prompts() -> None:
    table = {"a red x": [3.0, 4.0], "the red x": [0.0, 1.0], "a blue x": [1.0, 0.0], "the blue x": [1.0, 0.0]}

    def encode(prompts: list[str]) -> torch.Tensor:
        return _unit(torch.tensor([table[p] for p in prompts]))

    got = class_embeddings(encode, ["red x", "blue x"], ["a {}", "the {}"])
    red = torch.tensor([0.6 + 0.0, 0.8 + 1.0]) / 2
    assert torch.allclose(got[0], red / red.norm(), atol=1e-7)
    assert torch.allclose(got[1], torch.tensor([1.0, 0.0]))


def test_counts_are_ints_in_every_set_and_fractions_stay_floats() -> None:
    from tritower.evaluation.runner import counts_as_int

    metrics = {"eval_samples": 1500.0, "ood/eval_samples": 1500.0, "ood/eval_bad": 0.0,
               "eval_nonfinite@alpha=0.5": 0.0, "zeroshot_top1": 1.0, "ood/zeroshot_top1": 0.5}  # fmt: skip
    text = json.dumps(counts_as_int(metrics))
    assert text == (
        '{"eval_samples": 1500, "ood/eval_samples": 1500, "ood/eval_bad": 0, "eval_nonfinite@alpha=0.5": 0, '
        '"zeroshot_top1": 1.0, "ood/zeroshot_top1": 0.5}'
    )
