"""The default experiment, shortened: a real 1-rank ZeRO-3 run that must learn well above chance."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.launch


def test_default_experiment_learns_far_above_chance(train) -> None:
    # The full default (450 steps) reaches ~80% zero-shot top-1 on the 30 colour x shape classes;
    # 100 steps already put colours and some shapes in place (26.4% measured, chance is 3.3%).
    options = ("--train.steps=100", "--eval.every_steps=0", "--wandb.mode=disabled")
    metrics = train(*options, ranks=1, experiment="clip_tiny", command=True).metrics  # as the README types it
    chance = 1 / 30
    assert metrics["zeroshot_top1"] >= 5 * chance, metrics
    assert metrics["zeroshot_top5"] >= 0.5, metrics
    assert metrics["image_to_text_R@10"] > 10 / 1500, metrics  # retrieval above its chance level too
