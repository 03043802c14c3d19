"""Linear probes on frozen image features of a labelled set.

* Few-shot (big_vision's ``fewshot_lsr`` evaluator): features are L2-normalised and centred on the
  training shots' mean; targets are one-hot in {-1, +1}; the weights are the closed-form ridge
  solution W = (X^T X + l2 I)^-1 X^T Y; a test sample gets the class of highest X_test W.
  ``shots`` samples per class are drawn (seeded) as the training set, the other labelled samples
  are the test set. Classes with fewer than ``shots + 1`` samples are left out of that shot count.
* Full data: multinomial logistic regression with an L2 penalty, the objective of scikit-learn's
  ``LogisticRegression(C=C)`` (C times the summed cross-entropy plus half the squared weight norm;
  the bias is not penalised), minimised with L-BFGS in float64, trained on a seeded ``train_fraction``
  of the labelled samples and scored on the rest.

Unlabelled samples (label -1) are left out of both.
"""

from __future__ import annotations

import torch

FEWSHOT_SHOTS: tuple[int, ...] = (1, 5, 10, 25)


def split_shots(labels: torch.Tensor, shots: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) row indices: ``shots`` random rows of each class with more than ``shots`` rows
    for training, the other rows of those classes for testing."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in torch.unique(labels[labels >= 0]).tolist():
        rows = torch.nonzero(labels == label).flatten()
        if len(rows) <= shots:
            continue
        rows = rows[torch.randperm(len(rows), generator=generator)]
        train.append(rows[:shots])
        test.append(rows[shots:])
    if not train:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def ridge_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int, l2: float
) -> torch.Tensor:
    """Predicted classes of ``test_x`` from the closed-form regularised least-squares probe."""
    x = torch.nn.functional.normalize(train_x.double(), dim=1)
    t = torch.nn.functional.normalize(test_x.double(), dim=1)
    centre = x.mean(dim=0, keepdim=True)
    x, t = x - centre, t - centre
    targets = 2.0 * torch.nn.functional.one_hot(train_y, num_classes).double() - 1.0  # [n, C] in {-1, 1}
    gram = x.T @ x + l2 * torch.eye(x.shape[1], dtype=torch.float64)  # [D, D]
    weights = torch.linalg.solve(gram, x.T @ targets)  # [D, C]
    return (t @ weights).argmax(dim=1)


def fewshot_metrics(
    features: torch.Tensor,
    labels: torch.Tensor,
    shots: tuple[int, ...] = FEWSHOT_SHOTS,
    *,
    l2: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """``fewshot_{n}shot_top1`` for each n in ``shots`` (NaN when no class has n + 1 samples, or
    when a feature is not finite: such features are not scored)."""
    labels = labels.long()
    if not torch.isfinite(features).all():
        return {f"fewshot_{n}shot_top1": float("nan") for n in shots}
    num_classes = int(labels.max()) + 1 if (labels >= 0).any() else 0
    metrics = {}
    for n in shots:
        train, test = split_shots(labels, n, seed)
        if len(train) == 0:
            metrics[f"fewshot_{n}shot_top1"] = float("nan")
            continue
        predicted = ridge_probe(features[train], labels[train], features[test], num_classes, l2)
        metrics[f"fewshot_{n}shot_top1"] = (predicted == labels[test]).double().mean().item()
    return metrics


def split_fraction(labels: torch.Tensor, train_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) row indices of the labelled rows, a seeded random ``train_fraction`` for training."""
    rows = torch.nonzero(labels >= 0).flatten()
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    cut = int(round(train_fraction * len(rows)))
    return rows[:cut].sort().values, rows[cut:].sort().values


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float = 1.0, max_iter: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [D, K], bias [K]) minimising C * sum cross-entropy + 0.5 ||weights||^2."""
    x = x.double()
    weights = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weights + bias
        loss = C * torch.nn.functional.cross_entropy(logits, y, reduction="sum") + 0.5 * (weights**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach(), bias.detach()


def logistic_probe_metrics(
    features: torch.Tensor, labels: torch.Tensor, *, C: float = 1.0, train_fraction: float = 0.5, seed: int = 0
) -> dict[str, float]:
    """``linear_probe_top1``: test accuracy of the full-data logistic-regression probe (NaN when a
    feature is not finite)."""
    labels = labels.long()
    train, test = split_fraction(labels, train_fraction, seed)
    if not torch.isfinite(features).all() or len(train) == 0 or len(test) == 0 or len(torch.unique(labels[train])) < 2:
        return {"linear_probe_top1": float("nan")}
    num_classes = int(labels.max()) + 1
    x = torch.nn.functional.normalize(features.double(), dim=1)
    weights, bias = fit_logistic(x[train], labels[train], num_classes, C)
    predicted = (x[test] @ weights + bias).argmax(dim=1)
    return {"linear_probe_top1": (predicted == labels[test]).double().mean().item()}
