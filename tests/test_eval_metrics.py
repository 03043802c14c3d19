"""Retrieval and zero-shot metrics against plain NumPy written here and against clip_benchmark's
own metric functions on the same features (``clip-benchmark`` package, no model download)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tritower.evaluation import recall_at_k, retrieval_metrics, topk_accuracy


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_hit(scores: np.ndarray, positive: np.ndarray, k: int, tol: float = 1e-6) -> float:
    """P(a positive in the top k) for one query when tied candidates are shuffled uniformly."""
    best = scores[positive].max()
    above = int(np.sum(~positive & (scores > best + tol)))
    tied = int(np.sum(~positive & (np.abs(scores - best) <= tol)))
    tied_pos = int(np.sum(positive & (scores >= best - tol)))
    slots = k - above
    if slots <= 0:
        return 0.0
    if slots > tied:
        return 1.0
    return 1.0 - math.comb(tied, slots) / math.comb(tied + tied_pos, slots)


def numpy_retrieval(img: np.ndarray, txt: np.ndarray, owner: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    sim = img.astype(np.float64) @ txt.astype(np.float64).T  # [N, M]
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = np.mean([numpy_hit(sim[i], owner == i, k) for i in range(len(img))])
        out[f"text_to_image_R@{k}"] = np.mean(
            [numpy_hit(sim[:, j], np.arange(len(img)) == owner[j], k) for j in range(len(txt))]
        )
    return out


def test_recall_matches_numpy_and_clip_benchmark_multi_caption() -> None:
    from clip_benchmark.metrics.zeroshot_retrieval import batchify
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k as cb_recall

    rng = np.random.default_rng(0)
    img = _unit(rng.normal(size=(30, 8)))
    owner = np.repeat(np.arange(30), [1 + i % 5 for i in range(30)])  # 1 to 5 captions per image
    txt = _unit(img[owner] + 0.9 * rng.normal(size=(len(owner), 8)))
    ks = (1, 5, 10)
    got = retrieval_metrics(torch.tensor(img), torch.tensor(txt), torch.tensor(owner), ks)
    assert got == pytest.approx(numpy_retrieval(img, txt, owner, ks), abs=1e-9)
    # clip_benchmark: scores [texts, images]; "image_retrieval" is text->image, "text_retrieval" image->text.
    scores = torch.tensor(txt @ img.T, dtype=torch.float32)
    pairs = torch.zeros_like(scores, dtype=torch.bool)
    pairs[torch.arange(len(owner)), torch.tensor(owner)] = True
    for k in ks:
        t2i = (batchify(cb_recall, scores, pairs, 16, "cpu", k=k) > 0).float().mean().item()
        i2t = (batchify(cb_recall, scores.T, pairs.T, 16, "cpu", k=k) > 0).float().mean().item()
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i, abs=1e-6)
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t, abs=1e-6)
    assert 0 < got["image_to_text_R@1"] < got["image_to_text_R@10"] < 1


def test_constant_features_score_chance_not_one() -> None:
    n = 40
    same = torch.nn.functional.normalize(torch.ones(n, 6), dim=1)
    got = recall_at_k(same, same, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert got[f"image_to_text_R@{k}"] == pytest.approx(k / n, abs=1e-12)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(k / n, abs=1e-12)
    pessimistic = retrieval_metrics(same, same, torch.arange(n), (1, 5), pessimistic=True)
    assert set(pessimistic.values()) == {0.0}


def test_duplicated_captions_get_their_fair_share() -> None:
    # 12 images; images 0-5 share one caption text, 6-11 another: a perfect text tower cannot tell
    # the duplicates apart, so caption -> image R@1 is 1/6, not 1.
    rng = np.random.default_rng(3)
    groups = np.repeat([0, 1], 6)
    centres = _unit(rng.normal(size=(2, 16)))
    img = _unit(centres[groups] + 0.05 * rng.normal(size=(12, 16)))
    txt = np.repeat(centres, 6, axis=0)  # identical rows within a group
    owner = np.arange(12)
    got = retrieval_metrics(torch.tensor(img), torch.tensor(txt), torch.tensor(owner), (1, 5, 10))
    assert got == pytest.approx(numpy_retrieval(img, txt, owner, (1, 5, 10)), abs=1e-9)
    assert got["image_to_text_R@1"] == pytest.approx(1 / 6, abs=1e-9)
    assert got["image_to_text_R@5"] == pytest.approx(5 / 6, abs=1e-9)
    # Monte Carlo: shuffle tied captions by a tiny random jitter and count plain top-k hits.
    sims = img @ txt.T
    trials = [np.mean([np.argsort(-(sims[i] + 1e-9 * rng.random(12)))[0] == i for i in range(12)]) for _ in range(3000)]
    assert got["image_to_text_R@1"] == pytest.approx(float(np.mean(trials)), abs=0.02)


def test_zeroshot_labelled_only_and_mean_per_class_against_clip_benchmark() -> None:
    # clip_benchmark 1.6.2's own ``accuracy`` raises TypeError under NumPy 2 (float() of a [1]
    # array), so top-k is checked against scikit-learn, which clip_benchmark's balanced accuracy is.
    from clip_benchmark.metrics.zeroshot_classification import balanced_accuracy_score
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(1)
    classes = _unit(rng.normal(size=(7, 10)))
    labels = rng.choice(7, size=90, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    img = _unit(classes[labels] + 0.9 * rng.normal(size=(90, 10)))
    labels_with_missing = labels.copy()
    labels_with_missing[::9] = -1  # 10 unlabelled samples
    got = topk_accuracy(torch.tensor(img), torch.tensor(classes), torch.tensor(labels_with_missing), ks=(1, 5))
    keep = labels_with_missing >= 0
    logits, target = torch.tensor(img[keep] @ classes.T), torch.tensor(labels[keep])
    top1, top5 = (top_k_accuracy_score(target, logits, k=k, labels=range(7)) for k in (1, 5))
    assert got["zeroshot_top1"] == pytest.approx(top1, abs=1e-9)
    assert got["zeroshot_top5"] == pytest.approx(top5, abs=1e-9)
    pred = logits.argmax(dim=1)
    assert got["zeroshot_mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(target, pred), abs=1e-9)
    assert got["zeroshot_unlabelled"] == 10
    # Plain NumPy: top-1 over the labelled samples, per-class recall averaged over classes present.
    hits = (img[keep] @ classes.T).argmax(1) == labels[keep]
    assert got["zeroshot_top1"] == pytest.approx(hits.mean(), abs=1e-9)
    per_class = [hits[labels[keep] == c].mean() for c in np.unique(labels[keep])]
    assert got["zeroshot_mean_per_class_recall"] == pytest.approx(np.mean(per_class), abs=1e-9)
    assert got["zeroshot_mean_per_class_recall"] != pytest.approx(got["zeroshot_top1"], abs=1e-3)


def test_zeroshot_four_right_two_unlabelled_is_one() -> None:
    classes = torch.eye(3)
    images = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    got = topk_accuracy(images, classes, torch.tensor([0, 1, 2, 0, -1, -1]), ks=(1,))
    assert got["zeroshot_top1"] == 1.0 and got["zeroshot_unlabelled"] == 2


def test_zeroshot_constant_features_score_chance() -> None:
    got = topk_accuracy(torch.ones(50, 4) / 2, torch.eye(4)[:, :4].repeat(1, 1) * 0 + 0.5, torch.arange(50) % 4)
    assert got["zeroshot_top1"] == pytest.approx(1 / 4) and got["zeroshot_top5"] == 1.0


@pytest.mark.parametrize("block", [7, 64, 1 << 20])  # 1 query per block, uneven blocks, one block
def test_blocked_scoring_equals_plain_numpy(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Retrieval and zero-shot score queries in blocks whose size follows the candidate count
    # (memory flat in the set size): the metrics must not depend on where the blocks fall, ties included.
    from tritower.evaluation import ranking

    monkeypatch.setattr(ranking, "SCORE_BLOCK", block)
    rng = np.random.default_rng(7)
    img = _unit(rng.normal(size=(37, 6)))
    img[20:25] = img[3]  # equal images: caption queries with tied candidates
    owner = np.repeat(np.arange(37), [1 + i % 3 for i in range(37)])  # 1 to 3 captions per image
    txt = _unit(img[owner] + 0.7 * rng.normal(size=(len(owner), 6)))
    txt[owner == 9] = txt[owner == 10][0]  # a caption text repeated across images
    ks = (1, 5, 10)
    got = retrieval_metrics(torch.tensor(img), torch.tensor(txt), torch.tensor(owner), ks)
    assert got == pytest.approx(numpy_retrieval(img, txt, owner, ks), abs=1e-12)

    classes = _unit(rng.normal(size=(9, 6)))
    classes[4] = classes[2]  # two classes with one embedding: every sample of either is a tie
    labels = rng.integers(0, 9, size=len(img))
    labels[::11] = -1
    got = topk_accuracy(torch.tensor(img), torch.tensor(classes), torch.tensor(labels), ks=(1, 5))
    keep = labels >= 0
    sim = img[keep].astype(np.float64) @ classes.astype(np.float64).T
    hits = {k: np.array([numpy_hit(sim[i], np.arange(9) == t, k) for i, t in enumerate(labels[keep])]) for k in (1, 5)}
    assert got["zeroshot_top1"] == pytest.approx(hits[1].mean(), abs=1e-12)
    assert got["zeroshot_top5"] == pytest.approx(hits[5].mean(), abs=1e-12)
    recall = np.mean([hits[1][labels[keep] == c].mean() for c in np.unique(labels[keep])])
    assert got["zeroshot_mean_per_class_recall"] == pytest.approx(recall, abs=1e-12)
    assert 0 < hits[1][np.isin(labels[keep], [2, 4])].mean() < 1  # the tied classes got their half


def test_block_rows_bound_the_scores_held() -> None:
    from tritower.evaluation.ranking import SCORE_BLOCK, block_rows

    for candidates in (1, 1000, 50_000, SCORE_BLOCK, 10 * SCORE_BLOCK):
        rows = block_rows(candidates)
        assert rows >= 1 and (rows * candidates <= SCORE_BLOCK or rows == 1)
    assert block_rows(50_000) * 50_000 * 8 < 10 * 2**20  # one float64 block of 50k captions: under 10 MB
