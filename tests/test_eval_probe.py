"""Linear probes against a closed-form NumPy solve (few-shot, big_vision's regularised least
squares) and scikit-learn's LogisticRegression (full data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tritower.evaluation.linear_probe import fewshot_metrics, logistic_probe_metrics, split_fraction, split_shots


def clustered(seed: int, n: int = 240, classes: int = 6, dim: int = 12, noise: float = 1.2):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, n)
    return centres[labels] + noise * rng.normal(size=(n, dim)), labels


def test_fewshot_matches_numpy_closed_form() -> None:
    x, y = clustered(0)
    y[::17] = -1  # unlabelled rows take no part
    features, labels = torch.tensor(x), torch.tensor(y)
    got = fewshot_metrics(features, labels, (1, 5, 10, 25), l2=0.5, seed=3)
    for shots in (1, 5, 10, 25):
        train, test = (t.numpy() for t in split_shots(labels, shots, seed=3))
        assert all(np.sum(y[train] == c) == shots for c in np.unique(y[y >= 0]))
        assert not set(train) & set(test) and (y[test] >= 0).all()
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        centre = unit[train].mean(axis=0)
        a, b = unit[train] - centre, unit[test] - centre
        targets = 2.0 * np.eye(6)[y[train]] - 1.0
        weights = np.linalg.solve(a.T @ a + 0.5 * np.eye(12), a.T @ targets)
        expected = np.mean((b @ weights).argmax(axis=1) == y[test])
        assert got[f"fewshot_{shots}shot_top1"] == pytest.approx(expected, abs=1e-12)
    assert got["fewshot_25shot_top1"] > got["fewshot_1shot_top1"] > 1 / 6


def test_logistic_probe_matches_scikit_learn() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = clustered(1, noise=1.5)
    y[::13] = -1
    features, labels = torch.tensor(x), torch.tensor(y)
    got = logistic_probe_metrics(features, labels, C=0.7, train_fraction=0.6, seed=5)
    train, test = (t.numpy() for t in split_fraction(labels, 0.6, seed=5))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    reference = LogisticRegression(C=0.7, max_iter=5000, tol=1e-10).fit(unit[train], y[train])
    expected = reference.score(unit[test], y[test])
    assert got["linear_probe_top1"] == pytest.approx(expected, abs=1 / len(test) + 1e-12)
    # Same objective, same optimum: the weights agree closely, not just the accuracy.
    from tritower.evaluation.linear_probe import fit_logistic

    weights, bias = fit_logistic(torch.tensor(unit[train]), torch.tensor(y[train]), 6, C=0.7)
    ours = unit[test] @ weights.numpy() + bias.numpy()
    theirs = reference.decision_function(unit[test])
    # Softmax is shift-invariant per row: compare logits centred per row.
    centred = lambda z: z - z.mean(axis=1, keepdims=True)  # noqa: E731
    assert np.abs(centred(ours) - centred(theirs)).max() < 1e-3
