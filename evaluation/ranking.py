"""Hit rates of a ranking where ties are broken at random, in expectation.

A query scores every candidate; some candidates are its positives (one true class, the one image
of a caption, the several captions of an image). The query is a hit at k when a positive is among
the k best candidates. Scores that are equal (within ``tolerance``) are a tie, and a tie is not a
hit: the hit is counted with the probability it has when the tied candidates are put in a uniformly
random order. With ``a`` negatives strictly above the best positive score s*, ``t`` negatives tied
with s* and ``m`` positives tied at s*, the first positive of the tied group lands at position
``a + U``, where P(U >= j) = C(t, j) / C(t + m, j) (no positive among the first j of the group), so

    P(hit at k) = 0                                  if k <= a
                = 1 - C(t, k - a) / C(t + m, k - a)  otherwise (1 when k - a > t).

A model whose features are all equal thus scores chance (k / N for one positive among N), not 1.0
as "rank = number of strictly higher scores" does, and a caption duplicated across images is
credited only its fair share of the top k. ``pessimistic=True`` instead counts every tied negative
against the query (hit iff a + t < k).

A query with any non-finite score (NaN or Inf features: a diverged model) is not scored: its hit
probability is NaN, so every mean over it is NaN. Comparisons with NaN are all false, which would
otherwise make such a query a certain hit at every k.
"""

from __future__ import annotations

import torch

TIE_TOLERANCE = 1e-6
"""Scores closer than this are a tie: features of equal inputs computed in different rows of a
float32 matmul can differ in the last bits."""

SCORE_BLOCK = 1 << 20
"""Query-candidate scores held at once (queries per block = this // candidates, at least 1):
``hit_probabilities`` keeps about five float64 copies of a block, ~40 MB here whatever the set
size, where a fixed number of queries would grow with the candidates (1024 captions x 50,000
images: ~2 GB)."""


def block_rows(candidates: int) -> int:
    """Queries scored per block against ``candidates`` candidates (see ``SCORE_BLOCK``)."""
    return max(1, SCORE_BLOCK // max(candidates, 1))


def hit_probabilities(
    scores: torch.Tensor,
    positives: torch.Tensor,
    ks: tuple[int, ...],
    *,
    tolerance: float = TIE_TOLERANCE,
    pessimistic: bool = False,
) -> torch.Tensor:
    """[Q, len(ks)] float64: the probability that query q is a hit at each k (see the module).

    ``scores``: [Q, C] query-candidate scores; ``positives``: [Q, C] bool, each query with at least one.
    """
    scores = scores.double()
    best = scores.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values  # [Q, 1]
    negatives = ~positives
    above = (negatives & (scores > best + tolerance)).sum(dim=1)  # a
    tied = (negatives & ((scores - best).abs() <= tolerance)).sum(dim=1)  # t
    tied_positives = (positives & (scores >= best - tolerance)).sum(dim=1)  # m >= 1
    out = torch.zeros(scores.shape[0], len(ks), dtype=torch.float64)
    for column, k in enumerate(ks):
        slots = k - above  # j: places of the top k left for the tied group
        if pessimistic:
            out[:, column] = (above + tied < k).double()
            continue
        # C(t, j) / C(t + m, j) = prod_{i < j} (t - i) / (t + m - i); zero once i reaches t.
        none_positive = torch.ones(scores.shape[0], dtype=torch.float64)
        for i in range(k):
            factor = ((tied - i).clamp(min=0).double() / (tied + tied_positives - i).clamp(min=1).double()).clamp(
                max=1.0
            )
            none_positive = torch.where(slots > i, none_positive * factor, none_positive)
        out[:, column] = torch.where(slots > 0, 1.0 - none_positive, torch.zeros_like(none_positive))
    return out.masked_fill(~torch.isfinite(scores).all(dim=1, keepdim=True), float("nan"))
