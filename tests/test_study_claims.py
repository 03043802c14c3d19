"""The claims mode's statistics against numbers computed by hand (no training here), and its
figure from result records and run logs written by this test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tritower.benchmarks.study_claims import CLAIM_RUNS, claim_verdicts, draw_claims, paired


def test_paired_mean_standard_error_and_verdicts_by_hand() -> None:
    # d = 0.1, 0.2, 0.3: mean 0.2, sample sd 0.1, SE 0.1 / sqrt(3) = 0.0577; 0.2 > 2 * 0.0577.
    result = paired({0: 0.1, 1: 0.2, 2: 0.3}, ">")
    assert result["mean"] == pytest.approx(0.2) and result["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert result["n"] == 3 and result["verdict"] == "holds"
    # d = 0.1, -0.1, 0.3: mean 0.1, sd 0.2, SE 0.1155; 0.1 < 0.231: not resolved.
    assert paired({0: 0.1, 1: -0.1, 2: 0.3}, ">")["verdict"] == "within noise"
    assert paired({0: -0.1, 1: -0.2, 2: -0.3}, ">")["verdict"] == "does not hold"
    # ">=": holds unless the mean is more than 2 SE below zero.
    assert paired({0: 0.1, 1: -0.1, 2: -0.05}, ">=")["verdict"] == "holds"
    assert paired({0: -0.1, 1: -0.2, 2: -0.3}, ">=")["verdict"] == "does not hold"
    assert paired({0: 0.5}, ">")["verdict"] == "too few seeds"


def _result(setting: str, tower: str, seed: int, metrics: dict[str, float]) -> dict:
    return {"setting": setting, "tower": tower, "seed": seed, "key": f"{setting}-{tower}-s{seed}", "metrics": metrics}


# zero-shot top-1 in distribution / out of it, per (setting, tower), for seeds 0, 1, 2
TABLE = {
    ("uu", "none"): ([0.30, 0.32, 0.34], [0.10, 0.12, 0.11]),
    ("Lu", "matched"): ([0.80, 0.82, 0.81], [0.60, 0.65, 0.62]),
    ("Uu", "matched"): ([0.79, 0.80, 0.84], [0.40, 0.42, 0.47]),
    ("3T", "matched"): ([0.40, 0.43, 0.40], [0.20, 0.21, 0.22]),
    ("Lu", "mismatched"): ([0.30, 0.35, 0.31], [0.20, 0.22, 0.21]),
    ("3T", "mismatched"): ([0.38, 0.40, 0.39], [0.18, 0.19, 0.20]),
}


def _results() -> list[dict]:
    results = []
    for (setting, tower), (inside, outside) in TABLE.items():
        for seed in range(3):
            metrics = {"zeroshot_top1": inside[seed], "ood/zeroshot_top1": outside[seed]}
            if setting == "3T":  # the alpha sweep: ends 0.2 and the main towers' value, the middle 0.5
                for alpha, value in {0: 0.2, 0.25: 0.3, 0.5: 0.5 + 0.01 * seed, 0.75: 0.45, 1: inside[seed]}.items():
                    metrics[f"zeroshot_top1@alpha={alpha:g}"] = value
            results.append(_result(setting, tower, seed, metrics))
    return results


def test_each_claim_is_the_paired_difference_computed_by_hand() -> None:
    claims = {c["claim"]: c for c in claim_verdicts(_results())}
    ood = claims["locked > unlocked out of distribution"]
    # Lu - Uu out of distribution: 0.20, 0.23, 0.15 -> mean 0.19333
    assert ood["per_seed"] == pytest.approx({0: 0.20, 1: 0.23, 2: 0.15})
    assert ood["mean"] == pytest.approx(0.58 / 3) and ood["verdict"] == "holds"
    inside = claims["locked >= unlocked in distribution"]
    assert inside["per_seed"] == pytest.approx({0: 0.01, 1: 0.02, 2: -0.03}) and inside["verdict"] == "holds"
    three = claims["3T > uu (CLIP from scratch)"]
    assert three["per_seed"] == pytest.approx({0: 0.10, 1: 0.11, 2: 0.06}) and three["verdict"] == "holds"
    robust = claims["3T more robust than LiT to a mismatched tower"]
    # 3T drop: -0.02, -0.03, -0.01; Lu drop: -0.50, -0.47, -0.50 -> 0.48, 0.44, 0.49
    assert robust["per_seed"] == pytest.approx({0: 0.48, 1: 0.44, 2: 0.49}) and robust["verdict"] == "holds"
    mixture = claims["the alpha = 0.5 mixture beats both ends (matched tower)"]
    # alpha 0.5: 0.50, 0.51, 0.52 against max(0.2, main towers 0.40, 0.43, 0.40)
    assert mixture["per_seed"] == pytest.approx({0: 0.10, 1: 0.08, 2: 0.12}) and mixture["verdict"] == "holds"
    mismatched = claims["the alpha = 0.5 mixture beats both ends (mismatched tower)"]
    # against max(0.2, main towers 0.38, 0.40, 0.39)
    assert mismatched["per_seed"] == pytest.approx({0: 0.12, 1: 0.11, 2: 0.13})
    assert mismatched["context"]["alpha=0.5"] == pytest.approx(0.51)
    assert len(claims) == 6 and all(c["n"] == 3 for c in claims.values())


def test_a_seed_missing_from_one_side_is_left_out_of_the_pair() -> None:
    results = [r for r in _results() if not (r["setting"] == "Uu" and r["seed"] == 2)]
    claim = next(c for c in claim_verdicts(results) if c["claim"].startswith("locked > unlocked"))
    assert claim["n"] == 2 and claim["per_seed"] == pytest.approx({0: 0.20, 1: 0.23})


def test_the_figure_draws_from_results_and_run_logs(tmp_path: Path) -> None:
    results = _results()
    for result in results:
        if result["setting"] in ("uu", "3T"):
            folder = tmp_path / "runs" / result["key"]
            folder.mkdir(parents=True)
            records = [{"step": s, "event": "eval", "metrics": {"zeroshot_top1": 0.1 * s}} for s in (10, 20)]
            (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    draw_claims(results, tmp_path / "runs", tmp_path / "claims.png")
    assert (tmp_path / "claims.png").stat().st_size > 10_000
    assert {s for s, _ in CLAIM_RUNS} == {"uu", "Lu", "Uu", "3T"}


@pytest.mark.launch
def test_claims_code_path_at_toy_size(tmp_path: Path) -> None:
    """The claims mode end to end at toy size: both towers pretrained on every style, the six runs
    per seed through the real trainer, each evaluated in and out of distribution, verdicts, JSON,
    figure; a second call trains nothing."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "claims"
    command = [sys.executable, str(repo / "benchmarks" / "study.py"), "--toy", "--claims", "--seeds=0,1", "--jobs=2"]
    command.append(f"--out={out}")
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-5000:]
    report = json.loads((out / "claims.json").read_text())
    assert len(report["claims"]) == 6 and all(c["n"] == 2 for c in report["claims"])
    assert sorted(report["runs"]) == sorted(f"{s}-{t}-s{seed}" for seed in (0, 1) for s, t in CLAIM_RUNS)
    for key, metrics in report["runs"].items():
        saved = json.loads((out / "runs" / key / "metrics.json").read_text())
        assert metrics["zeroshot_top1"] == saved["zeroshot_top1"] and "ood/zeroshot_top1" in saved
    for kind in ("matched", "mismatched"):
        tower = report["towers"][kind]
        assert tower["styles"] == "broad" and "--data.builtin_styles=broad" in tower["command"]
    assert "sets: ood=builtin:outline+noisy+shades+offgrid" in (out / "runs" / "uu-none-s0" / "config.yaml").read_text()
    assert (out / "claims.png").stat().st_size > 10_000 and "locked > unlocked" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert again.returncode == 0 and "study claims: run " not in again.stdout, again.stdout[-3000:]


def _zero_shot(image: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 of unit rows against unit class rows, in NumPy."""
    return float((np.argmax(image @ classes.T, axis=1) == labels).mean())


def test_the_alpha_mixture_gains_from_complementary_ends_and_not_from_a_weaker_copy() -> None:
    """The mechanism behind the two alpha claims (docs/study.md "Claims mode"), on features built
    by hand and mixed by ``mix_embeddings``: a shape-only end and a colour-only end (the
    mismatched third tower beside main towers that read colour) score ~1/5 and ~1/6 alone and near
    1 mixed; an end that is the other plus noise (main towers that learnt what the matched third
    tower knows, less well) only adds its noise: the mixture stays below the better end."""
    import torch

    from tritower.model.mixture import mix_embeddings

    rng = np.random.default_rng(0)
    colours, shapes, n = 6, 5, 3000
    labels = rng.integers(0, colours * shapes, n)
    colour, shape = labels // shapes, labels % shapes

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def one_hot(index: np.ndarray, width: int) -> np.ndarray:
        return np.eye(width)[index]

    class_colour, class_shape = np.arange(colours * shapes) // shapes, np.arange(colours * shapes) % shapes
    noise = 0.05
    colour_end = (unit(one_hot(colour, colours) + noise * rng.standard_normal((n, colours))),
                  unit(one_hot(class_colour, colours)))  # fmt: skip
    shape_end = (unit(one_hot(shape, shapes) + noise * rng.standard_normal((n, shapes))),
                 unit(one_hot(class_shape, shapes)))  # fmt: skip

    def mixed(main: tuple, third: tuple, alpha: float) -> float:
        image = mix_embeddings(torch.from_numpy(main[0]), torch.from_numpy(third[0]), alpha).numpy()
        text = mix_embeddings(torch.from_numpy(main[1]), torch.from_numpy(third[1]), alpha).numpy()
        return _zero_shot(image, text, labels)

    ends = (_zero_shot(*colour_end, labels), _zero_shot(*shape_end, labels))
    assert max(ends) < 0.25  # each end alone knows one attribute: ~1/5 and ~1/6
    assert mixed(colour_end, shape_end, 0.5) > 0.95  # together, both

    both = np.concatenate([one_hot(colour, colours), one_hot(shape, shapes)], axis=1)
    classes = unit(np.concatenate([one_hot(class_colour, colours), one_hot(class_shape, shapes)], axis=1))
    third = (unit(both + 0.35 * rng.standard_normal(both.shape)), classes)
    main = (unit(third[0] + 0.5 * rng.standard_normal(both.shape)), classes)  # the third end plus noise
    best, weaker = _zero_shot(*third, labels), _zero_shot(*main, labels)
    assert weaker < best - 0.05
    for alpha in (0.25, 0.5, 0.75):
        assert mixed(main, third, alpha) < best
